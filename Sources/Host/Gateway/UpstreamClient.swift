// Pooled HTTP client for the LLM upstream (AsyncHTTPClient), with errors mapped to gateway errors.
internal import AsyncHTTPClient
internal import Foundation
internal import HTTPTypes
internal import NIOCore
internal import NIOHTTP1
internal import NIOPosix
internal import Synchronization

/// One shared, pooled connection manager to the configured upstream.
final class UpstreamClient: Sendable {
    let http: HTTPClient
    let baseURL: String
    let apiKey: String?
    let timeout: Double
    /// The upstream key, masked in the upstream's messages (it may quote the key it was sent).
    let secrets: SecretMask

    init(config: GatehouseConfig.Upstream) {
        var configuration = HTTPClient.Configuration()
        // `read` is an idle timeout between reads: a stream may run long, but not stall.
        configuration.timeout = .init(
            connect: .milliseconds(Int64(config.connectTimeout * 1000)), read: .milliseconds(Int64(config.timeout * 1000)))
        // Past the limit a request waits for a free connection, at most the connect timeout
        // (AsyncHTTPClient's `getConnectionFromPoolTimeout`, answered 503 `upstream_busy`).
        configuration.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: config.maxConnections)
        configuration.httpVersion = .http1Only
        // Not followed: AsyncHTTPClient would resend a POST redirected by 301/302 as a GET
        // without its body, and the answer to that would be a puzzle; the redirect itself is
        // reported (errorForStatus), naming what to fix.
        configuration.redirectConfiguration = .disallow
        http = HTTPClient(eventLoopGroup: MultiThreadedEventLoopGroup.singleton, configuration: configuration)
        baseURL = config.url.hasSuffix("/") ? String(config.url.dropLast()) : config.url
        apiKey = config.apiKey
        secrets = SecretMask([config.apiKey])
        timeout = config.timeout
    }

    func shutdown() async {
        try? await http.shutdown()
    }

    /// Sends a request and returns the response head with its body still streaming.
    /// - Throws: `OpenAIError` 502 (unreachable), 504 (timeout).
    func send(_ method: HTTPMethod, _ path: String, json: Data? = nil, requestID: String, timeout: Double? = nil) async throws -> HTTPClientResponse {
        var request = HTTPClientRequest(url: baseURL + path)
        request.method = method
        request.headers.add(name: "X-Request-ID", value: requestID)
        request.headers.add(name: "Accept", value: "application/json, text/event-stream, application/x-ndjson")
        if let apiKey { request.headers.add(name: "Authorization", value: "Bearer \(apiKey)") }
        if let json {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(data: json))
        }
        UpstreamAttempt.current?.sent()
        do {
            return try await http.execute(request, timeout: .milliseconds(Int64((timeout ?? self.timeout) * 1000)))
        } catch {
            throw map(error, path: path, timeout: timeout)
        }
    }

    /// Sends a request and returns the whole body of a 200 answer.
    /// - Throws: `OpenAIError` for transport failures and for any other status (the upstream's
    ///   own message kept), so every backend reports upstream trouble the same way.
    ///   The timeout bounds the whole exchange, body included: AsyncHTTPClient's own deadline
    ///   ends with the response head, and an upstream dripping its body would outlast it.
    func call(
        _ method: HTTPMethod, _ path: String, json: Data? = nil, requestID: String, backend: String, timeout: Double? = nil
    ) async throws -> ByteBuffer {
        let limit = timeout ?? self.timeout
        let started = ContinuousClock.now
        // Until the head, AsyncHTTPClient's deadline (which reports a refused connection as such).
        let response = try await send(method, path, json: json, requestID: requestID, timeout: limit)
        let left = limit - (ContinuousClock.now - started).inSeconds
        let body = try await Self.within(seconds: left, orElse: UpstreamFailure.deadline.error(target: baseURL + path, timeout: limit)) {
            try await self.collect(response, path: path)
        }
        guard response.status == .ok else {
            throw Self.upstreamStatusError(
                status: Int(response.status.code), body: body, backend: backend, retryAfter: response.headers.first(name: "Retry-After"),
                masking: secrets)
        }
        return body
    }

    /// `work`'s result, unless `seconds` pass first: then `work` is cancelled (AsyncHTTPClient
    /// abandons the request) and `error` thrown.
    static func within<T: Sendable>(seconds: Double, orElse error: OpenAIError, _ work: @escaping @Sendable () async throws -> T) async throws -> T {
        guard seconds > 0 else { throw error }
        return try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask { try await work() }
            group.addTask {
                try await Task.sleep(for: .milliseconds(Int64(seconds * 1000)))
                return nil
            }
            defer { group.cancelAll() }
            guard let first = try await group.next(), let value = first else { throw error }
            return value
        }
    }

    /// The longest a streamed answer may last in total. Streams are bounded by `timeout`
    /// between chunks (the read timeout) rather than by a whole-request deadline, so a long
    /// generation is not cut off while it is still producing tokens.
    static let streamDeadline = 3600.0

    /// Sends a request whose answer is streamed; throws (before any byte) unless it is a 200.
    /// The body ends with a 504 error once the stream has lasted `streamDeadline`.
    func openStream(_ path: String, json: Data, requestID: String, backend: String) async throws -> DeadlineBody<HTTPClientResponse.Body> {
        let limit = max(timeout, Self.streamDeadline)
        let started = ContinuousClock.now
        let response = try await send(.POST, path, json: json, requestID: requestID, timeout: limit)
        guard response.status == .ok else {
            let body = try await collect(response, path: path)
            throw Self.upstreamStatusError(
                status: Int(response.status.code), body: body, backend: backend, retryAfter: response.headers.first(name: "Retry-After"),
                masking: secrets)
        }
        return DeadlineBody(
            base: response.body, deadline: started + .milliseconds(Int64(limit * 1000)),
            error: UpstreamFailure.deadline.error(target: baseURL + path, timeout: limit))
    }

    /// The longest upstream reply read whole (a non-streamed answer, an error reply): a bound on
    /// the memory one request can take, far above any chat answer; a batch of embeddings of
    /// thousands of long vectors is what comes near it.
    static let maxReplyBytes = 64 * 1024 * 1024

    /// Reads a whole response body (bounded), mapping transport errors.
    func collect(_ response: HTTPClientResponse, path: String, limit: Int = UpstreamClient.maxReplyBytes) async throws -> ByteBuffer {
        do {
            return try await response.body.collect(upTo: limit)
        } catch {
            throw map(error, path: path)
        }
    }

    /// Turns a transport failure into the gateway error a client should see; `timeout` is the
    /// call's own limit when it has one (the readiness probe's 3 s, not `upstream.timeout`).
    func map(_ error: any Error, path: String, timeout: Double? = nil) -> any Error {
        if let error = error as? OpenAIError { return secrets.masked(error) }  // a mid-stream error in the upstream's words
        if error is CancellationError { return error }
        return UpstreamFailure(error).error(target: "\(baseURL)\(path)", timeout: timeout ?? self.timeout)
    }

    /// An upstream error status as a gateway error, keeping the upstream's own message.
    /// The upstream's `Retry-After` (a 429's or a 503's, in seconds or as an HTTP date) goes to
    /// the client with the error, so its SDK waits as long as the upstream asked.
    static func upstreamStatusError(status: Int, body: ByteBuffer, backend: String, retryAfter: String? = nil, masking secrets: SecretMask) -> OpenAIError {
        var error = secrets.masked(errorForStatus(status, body: body, backend: backend))
        if let retryAfter = retryAfter?.trimmingCharacters(in: .whitespaces), [429, 503].contains(status), isRetryAfterValue(retryAfter) {
            error.headers[.retryAfter] = retryAfter
        }
        return error
    }

    /// A `Retry-After` value worth passing on: whole seconds, or an HTTP date (RFC 9110 10.2.3),
    /// and nothing that could break the header line.
    static func isRetryAfterValue(_ value: String) -> Bool {
        guard !value.isEmpty, value.utf8.count <= 64 else { return false }
        if value.utf8.allSatisfy({ (0x30...0x39).contains($0) }) { return true }
        return value.utf8.allSatisfy { (0x20...0x7E).contains($0) } && value.contains("GMT")
    }

    private static func errorForStatus(_ status: Int, body: ByteBuffer, backend: String) -> OpenAIError {
        let details = upstreamError(body)
        let message = details.message ?? "HTTP \(status)"
        // The upstream's own code and param, where the client's request is at fault: a client
        // tells `context_length_exceeded` or `insufficient_quota` apart by them.
        func withUpstreamCode(_ error: OpenAIError) -> OpenAIError {
            var error = error
            if let code = details.code { error.code = code }
            error.param = details.param
            return error
        }
        switch status {
        case 404 where details.code == nil && message.range(of: "model", options: .caseInsensitive) == nil:
            // Not about a model (Ollama's, OpenAI's and vLLM's answers for an unknown one all name
            // it): the upstream has no such route, which the client cannot fix; its URL can.
            return OpenAIError(
                .badGateway, "\(backend) has no such route (HTTP 404: \(message)); check the upstream URL", code: "upstream_not_found")
        case 400, 404, 422:
            // The client's request was wrong for this backend (unknown model, bad field): say so.
            let gatewayStatus: HTTPResponse.Status = status == 404 ? .notFound : .badRequest
            return withUpstreamCode(OpenAIError(gatewayStatus, "\(backend) rejected the request: \(message)", code: status == 404 ? "model_not_found" : "upstream_rejected"))
        case 401, 403:
            return OpenAIError(.badGateway, "\(backend) refused the gateway's credentials: \(message)", code: "upstream_auth")
        case 429:
            return withUpstreamCode(OpenAIError(.tooManyRequests, "\(backend) is rate limiting: \(message)", code: "upstream_rate_limited"))
        case 500 where isValidationMessage(message):
            // llama-cpp-python's route handler answers every exception with 500, pydantic's
            // request validation errors too; those are the client's to fix, so say so.
            return withUpstreamCode(OpenAIError(
                .badRequest, "\(backend) rejected the request (it answered HTTP 500, but as a validation error): \(message)",
                code: "upstream_rejected"))
        case 300..<400:
            return OpenAIError(
                .badGateway, "\(backend) answered with a redirect (HTTP \(status)), which the gateway does not follow: set the upstream URL to the address it redirects to",
                code: "upstream_redirect")
        case 503:
            // Overloaded, not broken (Ollama past OLLAMA_MAX_QUEUE, vLLM or a load balancer with
            // no capacity): a 503 tells the client to come back, as the upstream did.
            return OpenAIError(.serviceUnavailable, "\(backend) is unavailable: \(message)", code: "upstream_unavailable")
        default:
            return OpenAIError(.badGateway, "\(backend) failed with HTTP \(status): \(message)", code: "upstream_error")
        }
    }

    /// Whether an upstream error message is a request validation error: pydantic's own text
    /// ("1 validation error for …") or FastAPI's list of errors located in the request body.
    static func isValidationMessage(_ message: String) -> Bool {
        message.range(of: "validation error", options: .caseInsensitive) != nil || message.contains("'loc': ('body'")
    }

    /// The error in an upstream body: the text of Ollama's {"error":"…"}, OpenAI's
    /// {"error":{"message":…}} or vLLM's older {"message":…} (else up to 300 bytes of the body
    /// as text), and OpenAI's `code` and `param` when they are strings (vLLM's numeric `code`
    /// is only the status again).
    static func upstreamError(_ body: ByteBuffer) -> (message: String?, code: String?, param: String?) {
        let data = Data(body.readableBytesView)
        if let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any], let details = upstreamError(in: object) {
            return details
        }
        let text = String(decoding: data.prefix(300), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        return (text.isEmpty ? nil : text, nil, nil)
    }

    /// The same, from a body already decoded: nil when it holds no message of any known shape.
    static func upstreamError(in object: [String: Any]) -> (message: String?, code: String?, param: String?)? {
        if let text = object["error"] as? String { return (text, nil, nil) }
        if let error = object["error"] as? [String: Any], let text = error["message"] as? String {
            return (text, (error["code"] as? String).flatMap { $0.isEmpty ? nil : $0 }, error["param"] as? String)
        }
        if let text = object["message"] as? String { return (text, nil, nil) }
        return nil
    }
}

/// Why an upstream exchange failed in transport, whichever HTTP client saw it (AsyncHTTPClient
/// or the chat pass-through), so clients get the same one-line reason from both.
enum UpstreamFailure: Error {
    /// No complete answer within the timeout.
    case deadline
    /// Nothing read for the timeout.
    case silence
    case connectTimeout
    /// Every connection `upstream.max_connections` allows was busy, and none came free within
    /// the connect timeout.
    case connectionsBusy
    /// The upstream closed the connection before the answer was complete.
    case closed
    /// The connection could not be made.
    case unreachable(String)
    /// The reply was longer than the limit (in bytes) on what the gateway reads whole.
    case tooLarge(Int)
    /// The reply broke HTTP/1.1's syntax or framing (the pass-through's parser says how).
    case malformed(String)
    case failed(String)

    init(_ error: any Error) {
        if let failure = error as? UpstreamFailure {
            self = failure
            return
        }
        if let error = error as? HTTPClientError {
            switch error {
            case .deadlineExceeded: self = .deadline; return
            case .readTimeout: self = .silence; return
            case .connectTimeout: self = .connectTimeout; return
            case .getConnectionFromPoolTimeout: self = .connectionsBusy; return
            case .remoteConnectionClosed: self = .closed; return
            default: break
            }
        }
        if let error = error as? MalformedUpstreamReply {
            self = .malformed(error.description)
            return
        }
        if let error = error as? NIOTooManyBytesError {
            self = .tooLarge(error.maxBytes ?? UpstreamClient.maxReplyBytes)
            return
        }
        if case .connectTimeout = error as? ChannelError {
            self = .connectTimeout
            return
        }
        let text = String(describing: error)
        if text.contains("refused") || text.contains("connect") || error is NIOConnectionError || text.contains("NXDOMAIN") || text.contains("resolve") {
            self = .unreachable(text)
        } else {
            self = .failed(text)
        }
    }

    /// The connection went away (closed, reset, broken) rather than timing out or refusing.
    var isConnectionLoss: Bool {
        switch self {
        case .closed, .failed: true
        // A malformed reply came from a live connection: sending the request again would not help.
        case .deadline, .silence, .connectTimeout, .connectionsBusy, .unreachable, .tooLarge, .malformed: false
        }
    }

    /// The client-visible error; `target` is the upstream URL that was called.
    func error(target: String, timeout: Double) -> OpenAIError {
        switch self {
        case .deadline:
            OpenAIError(.gatewayTimeout, "upstream did not answer within \(Self.seconds(timeout)) (\(target))", code: "upstream_timeout")
        case .silence:
            OpenAIError(.gatewayTimeout, "upstream sent nothing for \(Self.seconds(timeout)) (\(target))", code: "upstream_timeout")
        case .connectTimeout:
            OpenAIError(.badGateway, "upstream unreachable: connect timed out (\(target))", code: "upstream_unreachable")
        case .connectionsBusy:
            // The upstream is not at fault, only saturated: a 503 with Retry-After, which the SDKs retry.
            OpenAIError(
                .serviceUnavailable,
                "every upstream connection the gateway may open (upstream.max_connections) is in use, and none came free in time (\(target))",
                code: "upstream_busy"
            ).with(.retryAfter, "1")
        case .closed:
            OpenAIError(.badGateway, "upstream closed the connection (\(target))", code: "upstream_error")
        case .tooLarge(let limit):
            OpenAIError(.badGateway, "upstream reply is larger than \(limit / 1024 / 1024) MiB, the most the gateway reads for one answer (\(target))", code: "upstream_too_large")
        case .unreachable(let text):
            OpenAIError(.badGateway, "upstream unreachable: \(Self.reason(text)) (\(target))", code: "upstream_unreachable")
        case .failed(let text), .malformed(let text):
            OpenAIError(.badGateway, "upstream request failed: \(Self.reason(text)) (\(target))", code: "upstream_error")
        }
    }

    static func reason(_ text: String) -> String {
        if text.contains("refused") { return "connection refused" }
        return String(text.prefix(200)).replacingOccurrences(of: "\n", with: " ")
    }

    static func seconds(_ value: Double) -> String {
        value == value.rounded() ? "\(Int(value)) s" : "\(value) s"
    }
}

/// An upstream body that ends with `error` once `deadline` has passed: AsyncHTTPClient's own
/// deadline ends with the response head, and a stream may not run on for ever (a model looping
/// with Ollama's context shift). Checked as each part comes; silence is the read timeout's.
struct DeadlineBody<Base: AsyncSequence & Sendable>: AsyncSequence, Sendable where Base.Element == ByteBuffer {
    typealias Element = ByteBuffer
    let base: Base
    let deadline: ContinuousClock.Instant
    let error: OpenAIError

    struct AsyncIterator: AsyncIteratorProtocol {
        var base: Base.AsyncIterator
        let deadline: ContinuousClock.Instant
        let error: OpenAIError

        mutating func next() async throws -> ByteBuffer? {
            guard ContinuousClock.now < deadline else { throw error }
            return try await base.next()
        }
    }

    func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(base: base.makeAsyncIterator(), deadline: deadline, error: error)
    }
}

/// Whether an operation got as far as sending to the upstream: a failure before (the gateway's
/// own 400 for a request it cannot translate) is not the upstream's outcome, and is not timed
/// as one. Set for the operation's task by `ChatService`; marked by `UpstreamClient.send`.
final class UpstreamAttempt: Sendable {
    @TaskLocal static var current: UpstreamAttempt?

    private let wasSent = Atomic(false)

    func sent() { wasSent.store(true, ordering: .relaxed) }

    var hasSent: Bool { wasSent.load(ordering: .relaxed) }
}
