// PluginKit: the Swift SDK for Gatehouse plugin authors — a protocol to implement and one export line.
internal import PluginABI

/// A Gatehouse plugin written in Swift.
///
/// Implement this protocol and export it with one line:
///
/// ```swift
/// import PluginKit
///
/// struct HelloPlugin: GatehousePlugin {
///     static let name = "hello"
///     static let version = "1.0.0"
///     init(context: PluginContext) throws {}
///     func handle(_ request: PluginRequest, context: PluginContext) async throws -> PluginResponse {
///         PluginResponse(status: 200, headers: [("content-type", "text/plain")], body: Array("hi".utf8))
///     }
/// }
///
/// @_cdecl("gatehouse_plugin_entry_v1")
/// public func gatehousePluginEntry() -> UnsafeRawPointer { exportPlugin(HelloPlugin.self) }
/// ```
///
/// `handle` may run concurrently for many requests. Throwing from `handle` answers 500 with
/// an OpenAI-style JSON error carrying the error's description.
public protocol GatehousePlugin: Sendable {
    /// Must equal `name` in the plugin's manifest (`plugin.yaml`).
    static var name: String { get }
    /// Must equal `version` in the plugin's manifest.
    static var version: String { get }

    /// Called once when the host loads this version. Throw to refuse loading: the error's
    /// description becomes the one-line reason shown in `GET /v1/plugins`.
    init(context: PluginContext) throws

    /// Answer one request routed to `/v1/plugins/<name>/…`.
    /// - Parameters:
    ///   - request: the request; `path` is relative to the plugin's prefix.
    ///   - context: host services scoped to this request (log lines carry its request id).
    func handle(_ request: PluginRequest, context: PluginContext) async throws -> PluginResponse

    /// Called once before this version is released, after every request has completed.
    func shutdown() async
}

extension GatehousePlugin {
    public func shutdown() async {}
}

/// An HTTP request routed to a plugin; an owned copy, safe to keep.
public struct PluginRequest: Sendable {
    /// HTTP method, e.g. "POST".
    public var method: String
    /// Path relative to `/v1/plugins/<name>`, e.g. "/echo".
    public var path: String
    /// Query string without the leading "?".
    public var query: String
    /// Headers in order; names are lower-case.
    public var headers: [(name: String, value: String)]
    /// The whole request body.
    public var body: [UInt8]
    /// The gateway's request id for this request.
    public var requestID: String

    public init(
        method: String, path: String, query: String = "", headers: [(name: String, value: String)] = [],
        body: [UInt8] = [], requestID: String = ""
    ) {
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.requestID = requestID
    }

    /// The first value of header `name` (case-insensitive), if present.
    public func header(_ name: String) -> String? {
        let wanted = name.lowercased()
        return headers.first { $0.name == wanted }?.value
    }

    /// The body decoded as UTF-8 text.
    public var text: String { String(decoding: body, as: UTF8.self) }
}

/// A plugin's answer: a whole body, or a stream of chunks.
public struct PluginResponse: Sendable {
    /// How the body is delivered.
    public enum Body: Sendable {
        case bytes([UInt8])
        /// Chunks are sent as they are produced (e.g. server-sent events).
        case stream(AsyncThrowingStream<[UInt8], any Error>)
    }

    public var status: UInt16
    public var headers: [(name: String, value: String)]
    public var body: Body

    public init(status: UInt16 = 200, headers: [(name: String, value: String)] = [], body: [UInt8] = []) {
        self.status = status
        self.headers = headers
        self.body = .bytes(body)
    }

    public init(status: UInt16 = 200, headers: [(name: String, value: String)] = [], stream: AsyncThrowingStream<[UInt8], any Error>) {
        self.status = status
        self.headers = headers
        self.body = .stream(stream)
    }

    /// A JSON error in OpenAI's shape: `{"error":{"message":…,"type":…,"code":…,"param":…}}`
    /// (`code` and `param` null when not given, as in OpenAI's own errors).
    public static func error(status: UInt16, message: String, type: String = "plugin_error", code: String? = nil, param: String? = nil) -> PluginResponse {
        let members = [
            "\"message\":\(jsonQuote(message))", "\"type\":\(jsonQuote(type))",
            "\"code\":\(code.map(jsonQuote) ?? "null")", "\"param\":\(param.map(jsonQuote) ?? "null")",
        ]
        let body = "{\"error\":{\(members.joined(separator: ","))}}"
        return PluginResponse(status: status, headers: [("content-type", "application/json")], body: Array(body.utf8))
    }

    /// A failed LLM call passed on to the client as the gateway would have answered it: its
    /// status, message, `type`, `code` and `param`.
    public static func error(_ failure: LLMError) -> PluginResponse {
        .error(
            status: UInt16(clamping: failure.status), message: failure.message, type: failure.type ?? "api_error", code: failure.code,
            param: failure.param)
    }
}

/// `s` as a JSON string literal, with the escapes JSON requires.
func jsonQuote(_ s: String) -> String {
    var out = "\""
    for scalar in s.unicodeScalars {
        switch scalar {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        case _ where scalar.value < 0x20:
            let hex = String(scalar.value, radix: 16)
            out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out + "\""
}
