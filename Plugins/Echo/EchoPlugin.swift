// Echo: the minimal reference plugin — POST /v1/plugins/echo/echo returns the body unchanged.
import PluginKit

struct EchoPlugin: GatehousePlugin {
    static let name = "echo"
    static let version = "1.0.0"

    init(context: PluginContext) throws {
        context.info("echo ready")
    }

    func handle(_ request: PluginRequest, context: PluginContext) async throws -> PluginResponse {
        guard request.path == "/echo" else {
            return .error(status: 404, message: "echo has no route \(request.path); try POST /echo", type: "not_found")
        }
        guard request.method == "POST" else {
            return .error(status: 405, message: "use POST for /echo", type: "method_not_allowed")
        }
        context.debug("echoing", ["bytes": String(request.body.count)])
        return PluginResponse(
            status: 200,
            headers: [
                ("content-type", request.header("content-type") ?? "application/octet-stream"),
                ("x-echo-plugin-version", Self.version),
            ],
            body: request.body)
    }
}

@_cdecl("gatehouse_plugin_entry_v1")
public func gatehousePluginEntry() -> UnsafeRawPointer { exportPlugin(EchoPlugin.self) }
