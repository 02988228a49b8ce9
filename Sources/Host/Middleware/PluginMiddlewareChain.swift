// Runs plugins' request and response middleware around every route (health checks excepted).
internal import Foundation
internal import HTTPTypes
public import Hummingbird
internal import NIOCore
internal import NIOPosix
internal import NIOConcurrencyHelpers
internal import PluginABI

/// The state behind one `gh_mw_call*`: what a middleware function may change. Lives only for
/// the duration of one middleware call chain on one request.
final class MiddlewareCallState {
    enum Phase { case request, response }

    let phase: Phase
    var headers: [(String, String)]
    var body: ByteBuffer
    let bodyIsStream: Bool
    var status: Int
    /// Set by `mw_respond`: the request is answered without reaching the route.
    var shortCircuit: (status: Int, headers: [(String, String)], body: ByteBuffer)?

    init(phase: Phase, headers: [(String, String)], body: ByteBuffer, bodyIsStream: Bool, status: Int) {
        self.phase = phase
        self.headers = headers
        self.body = body
        self.bodyIsStream = bodyIsStream
        self.status = status
    }

    // MARK: Live calls

    /// The calls whose middleware function is running, by token. A `gh_mw_call*` is a random
    /// token (`PluginHandleToken`), as a `gh_exchange*` is, never this object's address: a
    /// plugin that keeps one past its function's return, and uses it from another thread, gets
    /// `GH_ERR_STATE` rather than crash the gateway, and the `mw_*` calls on one call, from any
    /// thread, take turns under the table's lock (an NIOLock: the states are not Sendable, and are touched only under it
    /// while open, by the host's task otherwise).
    private final class LiveCalls: @unchecked Sendable {
        let lock = NIOLock()
        var live: [UInt: MiddlewareCallState] = [:]
    }

    private static let liveCalls = LiveCalls()

    /// Runs `function` with this state open as a call, passed as its token; closed after.
    func whileOpen(_ function: (OpaquePointer) -> Void) {
        let calls = Self.liveCalls
        let token = calls.lock.withLock {
            let token = PluginHandleToken.make { calls.live[$0] != nil }
            calls.live[token] = self
            return token
        }
        function(OpaquePointer(bitPattern: token)!)
        // Under the lock: a plugin thread's mw_* call still running finishes before the host reads.
        _ = calls.lock.withLock { calls.live.removeValue(forKey: token) }
    }

    /// `body` applied to the open call `pointer` names, under the table's lock; nil when it
    /// names none (its function has returned, or it was never one).
    static func with<T>(_ pointer: OpaquePointer, _ body: (MiddlewareCallState) -> T) -> T? {
        liveCalls.lock.withLock { liveCalls.live[UInt(bitPattern: pointer)].map(body) }
    }

    /// The request id of the middleware call running on this thread, if any: a middleware
    /// function has no exchange to log with, and its lines belong to that request all the same.
    /// (Middleware functions are called synchronously, so the call runs on the thread that set it.)
    static var requestIDOnThisThread: String? { currentRequestID.currentValue?.id }

    /// Runs `body` with `requestID` as this thread's middleware request id.
    static func withRequestID<T>(_ requestID: String, _ body: () -> T) -> T {
        let previous = currentRequestID.currentValue
        currentRequestID.currentValue = RequestIDBox(id: requestID)
        defer { currentRequestID.currentValue = previous }
        return body()
    }

    private final class RequestIDBox: Sendable {
        let id: String
        init(id: String) { self.id = id }
    }

    private static let currentRequestID = ThreadSpecificVariable<RequestIDBox>()

    func setHeader(_ name: String, _ value: String) {
        let lowered = name.lowercased()
        headers.removeAll { $0.0 == lowered }
        headers.append((lowered, value))
    }

    func removeHeader(_ name: String) {
        let lowered = name.lowercased()
        headers.removeAll { $0.0 == lowered }
    }
}

/// Calls every applicable plugin middleware: request functions in priority order (any may
/// answer the request itself), then the route, then response functions in reverse order.
public struct PluginMiddlewareChain: RouterMiddleware {
    public typealias Context = GatehouseRequestContext
    let table: MiddlewareTable
    let services: PluginServices
    let maxBodyBytes: Int

    init(services: PluginServices, maxBodyBytes: Int) {
        self.table = services.middleware
        self.services = services
        self.maxBodyBytes = maxBodyBytes
    }

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let path = request.uri.path
        guard !table.isEmpty, !APIKeyCheck.isExempt(path) else { return try await next(request, context) }
        let applicable = table.snapshot().filter { $0.applies(to: path) }
        guard !applicable.isEmpty else { return try await next(request, context) }

        var request = request
        let requestPhase = applicable.filter { $0.onRequest != nil }
        if !requestPhase.isEmpty {
            let body = try await request.body.collect(upTo: maxBodyBytes)
            let state = MiddlewareCallState(
                phase: .request, headers: request.headers.map { ($0.name.canonicalName, $0.value) }, body: body, bodyIsStream: false, status: 0)
            for middleware in requestPhase {
                invoke(middleware, middleware.onRequest!, state: state, request: request, context: context)
                if let answer = state.shortCircuit {
                    return Response(
                        status: HTTPResponse.Status(code: answer.status), headers: PluginRoutes.responseFields(answer.headers, plugin: middleware.instance.manifest.name, logger: context.logger),
                        body: PluginStatus.allowsBody(answer.status) ? .init(byteBuffer: answer.body) : .init())
                }
            }
            var head = request.head
            head.headerFields = Self.fields(state.headers)
            request = Request(head: head, body: .init(buffer: state.body))
        }

        var response: Response
        do {
            response = try await next(request, context)
        } catch {
            // Response middleware see error responses too, in their final JSON form.
            response = AccessLogMiddleware.response(for: error, request: request, context: context)
        }
        let responsePhase = applicable.filter { $0.onResponse != nil }.reversed()
        guard !responsePhase.isEmpty else { return response }
        let isStream = response.body.contentLength == nil
        let body = isStream ? ByteBuffer() : try await Self.collect(response.body)
        // Framing is the server's: middleware neither see nor set it. It is put back below and
        // follows the body (a HEAD answer keeps its GET's length).
        var framing = HTTPFields()
        var visible: [(String, String)] = []
        for field in response.headers {
            if PluginRoutes.reservedResponseHeaders.contains(field.name.canonicalName) {
                framing.append(field)
            } else {
                visible.append((field.name.canonicalName, field.value))
            }
        }
        let state = MiddlewareCallState(phase: .response, headers: visible, body: body, bodyIsStream: isStream, status: response.status.code)
        for middleware in responsePhase {
            invoke(middleware, middleware.onResponse!, state: state, request: request, context: context)
        }
        response.status = HTTPResponse.Status(code: state.status)
        var headers = PluginRoutes.responseFields(
            state.headers, plugin: Set(responsePhase.map { $0.instance.manifest.name }).sorted().joined(separator: ","), logger: context.logger)
        headers.append(contentsOf: framing)
        response.headers = headers
        if !PluginStatus.allowsBody(state.status) {
            response.body = .init()  // a 204 or 304 set by a middleware: nothing may follow its head
            response.headers[.contentLength] = nil
        } else if !isStream {
            response.body = .init(byteBuffer: state.body)  // a changed length replaces the old
        }
        return response
    }

    /// Calls one middleware function with a borrowed C view of the request or response.
    private func invoke(
        _ middleware: RegisteredMiddleware, _ function: gh_middleware_fn, state: MiddlewareCallState, request: Request, context: Context
    ) {
        middleware.instance.requestStarted()
        defer { middleware.instance.requestFinished() }
        let call = PluginCall(
            method: request.method.rawValue, path: request.uri.path, query: request.uri.query ?? "", headers: state.headers,
            body: state.phase == .request || !state.bodyIsStream ? state.body : ByteBuffer(), requestID: context.requestID)
        call.withCRequest { cRequest in
            var message = gh_mw_message(
                struct_size: UInt32(MemoryLayout<gh_mw_message>.size), method: cRequest.pointee.method, path: cRequest.pointee.path,
                query: cRequest.pointee.query, headers: cRequest.pointee.headers, header_count: cRequest.pointee.header_count,
                body: cRequest.pointee.body, request_id: cRequest.pointee.request_id,
                status: state.phase == .response ? UInt16(clamping: state.status) : 0, body_is_stream: state.bodyIsStream ? 1 : 0)
            MiddlewareCallState.withRequestID(context.requestID) {
                state.whileOpen { pointer in function(middleware.context, &message, pointer) }
            }
        }
        middleware.instance.stats.middlewareInvoked(shortCircuited: state.shortCircuit != nil)
    }

    static func fields(_ pairs: [(String, String)]) -> HTTPFields {
        var fields = HTTPFields()
        for (name, value) in pairs {
            if let fieldName = HTTPField.Name(name) { fields.append(HTTPField(name: fieldName, value: value)) }
        }
        return fields
    }

    /// Reads a fixed-length response body into one buffer.
    static func collect(_ body: ResponseBody) async throws -> ByteBuffer {
        let sink = CollectedBody()
        try await body.write(CollectingWriter(sink: sink))
        return sink.buffer
    }
}

private final class CollectedBody: @unchecked Sendable {
    var buffer = ByteBuffer()
}

private struct CollectingWriter: ResponseBodyWriter {
    let sink: CollectedBody

    mutating func write(_ buffer: ByteBuffer) async throws {
        var buffer = buffer
        sink.buffer.writeBuffer(&buffer)
    }

    consuming func finish(_ trailingHeaders: HTTPFields?) async throws {}
}
