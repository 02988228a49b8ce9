// Registering request/response middleware from a Swift plugin.
internal import PluginABI

/// Which requests a middleware sees.
public enum MiddlewareScope: Sendable, Equatable {
    /// Every route, including `/v1/chat/completions` (health checks excepted).
    case all
    /// Only this plugin's own routes, `/v1/plugins/<name>/…`.
    case ownRoutes
    /// Paths starting with the given prefix, e.g. "/v1/chat/".
    case pathPrefix(String)
}

/// One middleware invocation: the request (or response) and the edits you may make.
/// Valid only inside the middleware function; do not keep it.
public final class MiddlewareCall: @unchecked Sendable {
    private let host: UnsafePointer<gh_host_api>
    private let call: OpaquePointer

    /// Request method and path (in both phases).
    public let method: String
    public let path: String
    public let query: String
    /// Request headers in the request phase, response headers in the response phase (lower-case names).
    public let headers: [(name: String, value: String)]
    /// The request body, or the response body (empty when `bodyIsStream`).
    public let body: [UInt8]
    public let requestID: String
    /// Response phase: the status code; 0 in the request phase.
    public let status: Int
    /// Response phase: the body is streamed and can be neither read nor replaced.
    public let bodyIsStream: Bool

    init(host: UnsafePointer<gh_host_api>, call: OpaquePointer, message: gh_mw_message) {
        self.host = host
        self.call = call
        method = String(message.method)
        path = String(message.path)
        query = String(message.query)
        headers = (0..<message.header_count).map { (String(message.headers[$0].name), String(message.headers[$0].value)) }
        body = Array(message.body)
        requestID = String(message.request_id)
        status = Int(message.status)
        bodyIsStream = message.body_is_stream != 0
    }

    /// The first value of header `name` (case-insensitive).
    public func header(_ name: String) -> String? {
        let wanted = name.lowercased()
        return headers.first { $0.name == wanted }?.value
    }

    /// Sets header `name`, replacing existing values.
    @discardableResult public func setHeader(_ name: String, _ value: String) -> Bool {
        var name = name
        var value = value
        return name.withUTF8 { n in value.withUTF8 { v in
            host.pointee.mw_set_header(call, gh_bytes(data: n.baseAddress, len: n.count), gh_bytes(data: v.baseAddress, len: v.count)) == GH_OK
        } }
    }

    /// Removes header `name`.
    @discardableResult public func removeHeader(_ name: String) -> Bool {
        var name = name
        return name.withUTF8 { n in host.pointee.mw_remove_header(call, gh_bytes(data: n.baseAddress, len: n.count)) == GH_OK }
    }

    /// Replaces the body (not possible for streamed responses).
    @discardableResult public func setBody(_ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBufferPointer { host.pointee.mw_set_body(call, gh_bytes(data: $0.baseAddress, len: $0.count)) == GH_OK }
    }

    /// Response phase: replaces the status code.
    @discardableResult public func setStatus(_ status: Int) -> Bool {
        guard let code = UInt16(exactly: status) else { return false }
        return host.pointee.mw_set_status(call, code) == GH_OK
    }

    /// Request phase: answers the request now; the route and later middleware are skipped.
    /// Streamed bodies are not possible here.
    @discardableResult public func respond(_ response: PluginResponse) -> Bool {
        guard case .bytes(let body) = response.body else { return false }
        return withHeaderArray(response.headers) { headers, count in
            body.withUnsafeBufferPointer { bytes in
                host.pointee.mw_respond(call, response.status, headers, count, gh_bytes(data: bytes.baseAddress, len: bytes.count)) == GH_OK
            }
        }
    }
}

/// Why the host refused something a plugin asked for.
public struct PluginKitError: Error, Sendable, CustomStringConvertible {
    public let description: String
}

extension PluginContext {
    /// Installs a middleware. It runs inline on the request path for every request in `scope`:
    /// keep it quick and never block. Removed automatically with this plugin version.
    ///
    /// ```swift
    /// try context.addMiddleware(name: "require-team", scope: .pathPrefix("/v1/chat/")) { call in
    ///     if call.header("x-team") == nil { call.respond(.error(status: 403, message: "send X-Team")) }
    /// }
    /// ```
    /// - Parameters:
    ///   - priority: lower runs first on requests; response functions run in reverse order.
    ///   - onRequest: sees (and may edit or answer) the request before the route.
    ///   - onResponse: sees (and may edit) the response after the route.
    public func addMiddleware(
        name: String, priority: Int32 = 0, scope: MiddlewareScope = .all, onRequest: (@Sendable (MiddlewareCall) -> Void)? = nil,
        onResponse: (@Sendable (MiddlewareCall) -> Void)? = nil
    ) throws {
        guard hostOffers(MemoryLayout<gh_host_api>.offset(of: \gh_host_api.middleware_register)!) else {
            throw PluginKitError(description: "this host speaks ABI 1.0, which has no middleware")
        }
        let box = Unmanaged.passRetained(MiddlewareBox(host: host, onRequest: onRequest, onResponse: onResponse)).toOpaque()
        let prefix: String
        let kind: gh_middleware_scope
        switch scope {
        case .all: (kind, prefix) = (GH_SCOPE_ALL, "")
        case .ownRoutes: (kind, prefix) = (GH_SCOPE_OWN_ROUTES, "")
        case .pathPrefix(let path): (kind, prefix) = (GH_SCOPE_PREFIX, path)
        }
        let status = name.withCString { cName in
            prefix.withCString { cPrefix in
                var spec = gh_middleware_spec(
                    struct_size: UInt32(MemoryLayout<gh_middleware_spec>.size), name: cName, priority: priority, scope: kind, path_prefix: cPrefix,
                    on_request: onRequest == nil ? nil : middlewareRequestThunk, on_response: onResponse == nil ? nil : middlewareResponseThunk,
                    context: box)
                return host.pointee.middleware_register(plugin, &spec)
            }
        }
        guard status == GH_OK else {
            Unmanaged<MiddlewareBox>.fromOpaque(box).release()
            throw PluginKitError(description: "the host refused middleware \(name) (status \(status.rawValue))")
        }
    }
}

/// The Swift closures behind one registered middleware; kept for the life of the library.
private final class MiddlewareBox: @unchecked Sendable {
    let host: UnsafePointer<gh_host_api>
    let onRequest: (@Sendable (MiddlewareCall) -> Void)?
    let onResponse: (@Sendable (MiddlewareCall) -> Void)?

    init(host: UnsafePointer<gh_host_api>, onRequest: (@Sendable (MiddlewareCall) -> Void)?, onResponse: (@Sendable (MiddlewareCall) -> Void)?) {
        self.host = host
        self.onRequest = onRequest
        self.onResponse = onResponse
    }
}

private let middlewareRequestThunk: gh_middleware_fn = { context, message, call in
    guard let context, let message, let call else { return }
    let box = Unmanaged<MiddlewareBox>.fromOpaque(context).takeUnretainedValue()
    box.onRequest?(MiddlewareCall(host: box.host, call: call, message: message.pointee))
}

private let middlewareResponseThunk: gh_middleware_fn = { context, message, call in
    guard let context, let message, let call else { return }
    let box = Unmanaged<MiddlewareBox>.fromOpaque(context).takeUnretainedValue()
    box.onResponse?(MiddlewareCall(host: box.host, call: call, message: message.pointee))
}
