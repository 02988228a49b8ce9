// Every request's final word: errors become OpenAI-shaped JSON; one access-log line and metrics per request.
internal import Foundation
public import Hummingbird
internal import Logging
internal import NIOCore
internal import NIOHTTP1
internal import Synchronization

/// The outermost gateway middleware after the request id: converts Hummingbird's own errors
/// (404 no route, 413 body too large, ...) and unexpected errors into OpenAI-shaped JSON, and
/// when the response has ended (a stream at its end) writes one access-log line with method,
/// path, status and latency, and counts the request by route template in the metrics.
public struct AccessLogMiddleware: RouterMiddleware {
    public typealias Context = GatehouseRequestContext
    let metrics: GatehouseMetrics?

    init(metrics: GatehouseMetrics?) {
        self.metrics = metrics
    }

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let record = RequestRecord(
            metrics: metrics, logger: context.logger, method: request.method.rawValue, path: request.uri.path, client: context.remoteAddress)
        var response: Response
        do {
            response = try await next(request, context)
        } catch {
            response = Self.response(for: error, request: request, context: context)
        }
        // A route's template, or "unmatched" when none took the request: refused before routing,
        // or no route at all (Hummingbird marks that "NotFound", which is no template).
        let route = context.endpointPath.flatMap { $0.hasPrefix("/") ? $0 : nil } ?? "unmatched"
        record.answered(status: response.status.code, route: route, streamed: response.body.contentLength == nil)
        let body = response.body
        response.body = ResponseBody(contentLength: body.contentLength) { writer in
            defer { record.finish() }
            try await body.write(writer)
        }
        return response
    }

    /// The access-log line of one request (also written by the chat pass-through, which passes
    /// `requestID` instead of keeping it in the logger's metadata). `client` is the client's
    /// address (behind trusted proxies, the one they forwarded).
    static func log(
        _ logger: Logger, method: String, path: String, status: Int, elapsed: Duration, firstByte: Duration? = nil, requestID: String? = nil, client: String
    ) {
        guard logger.logLevel <= .info else { return }
        if let handler = logger.handler as? JSONLogHandler {
            handler.logAccess(method: method, path: path, status: status, latency: elapsed, firstByte: firstByte, requestID: requestID, client: client)
            return
        }
        var metadata: Logger.Metadata = [
            "method": .string(method), "path": .string(path), "status": .stringConvertible(status),
            "latency_ms": .string(JSONLogHandler.milliseconds(elapsed)), "client": .string(client),
        ]
        if let firstByte { metadata["ttfb_ms"] = .string(JSONLogHandler.milliseconds(firstByte)) }
        if let requestID { metadata["request_id"] = .string(requestID) }
        logger.info("request", metadata: metadata)
    }

    /// The OpenAI-shaped response for any error thrown on the request path.
    static func response(for error: any Error, request: Request, context: Context) -> Response {
        switch error {
        case let error as OpenAIError:
            error.logIfServerSide(context.logger)
            return error.response(requestID: context.requestID)
        case let error as HTTPError:
            return openAIError(for: error, request: request).response(requestID: context.requestID)
        case is NIOTooManyBytesError:
            return openAIError(for: HTTPError(.contentTooLarge), request: request).response(requestID: context.requestID)
        case is CancellationError:
            // A router request's task is cancelled only when the shutdown's time runs out (a
            // client that leaves is told apart by ClientDeparture).
            return response(for: OpenAIError.serverShuttingDown, request: request, context: context)
        case let error as HTTPParserError:
            // The body broke HTTP's framing (a bad chunk size, say): the client's error.
            return OpenAIError.malformedRequest(error).response(requestID: context.requestID)
        default:
            context.logger.error("unhandled error", metadata: ["error": .string(String(describing: error))])
            return OpenAIError(.internalServerError, "internal error: \(error)").response(requestID: context.requestID)
        }
    }

    static func openAIError(for error: HTTPError, request: Request) -> OpenAIError {
        switch error.status {
        case .notFound:
            return OpenAIError(.notFound, "no route for \(request.method.rawValue) \(request.uri.path)", code: "route_not_found")
        case .contentTooLarge:
            return .bodyTooLarge
        case .methodNotAllowed:
            return OpenAIError(.methodNotAllowed, "\(request.method.rawValue) is not allowed on \(request.uri.path)", code: "method_not_allowed")
        default:
            var converted = OpenAIError(error.status, error.body ?? error.status.reasonPhrase)
            converted.headers = error.headers
            return converted
        }
    }
}

/// One router request's accounting, done once when its response has ended: the access line and
/// the metrics. Also done when the response's body is never written, so no request is lost
/// from the counts or left in flight: a HEAD answer (Hummingbird answers HEAD with GET's
/// response, its body dropped unwritten), or a client gone before the head could be written.
final class RequestRecord: Sendable {
    private struct Answer {
        var status = 500
        var route = "unmatched"
        /// For a streamed response, the time to its head.
        var firstByte: Duration?
        var finished = false
    }

    private let metrics: GatehouseMetrics?
    private let logger: Logger
    private let method: String
    private let path: String
    private let client: String
    private let start = ContinuousClock.now
    private let answer = Mutex(Answer())

    init(metrics: GatehouseMetrics?, logger: Logger, method: String, path: String, client: String) {
        self.metrics = metrics
        self.logger = logger
        self.method = method
        self.path = path
        self.client = client
        metrics?.inFlight.increment()
    }

    /// The route has answered with this status; `streamed`: the body follows, of unknown length.
    func answered(status: Int, route: String, streamed: Bool) {
        let firstByte = streamed ? ContinuousClock.now - start : nil
        answer.withLock { $0 = Answer(status: status, route: route, firstByte: firstByte) }
    }

    /// The response has ended (or will never be written): logs and counts it, once.
    func finish() {
        let elapsed = ContinuousClock.now - start
        guard let answer = answer.withLock({ answer -> Answer? in
            guard !answer.finished else { return nil }
            answer.finished = true
            return answer
        }) else { return }
        AccessLogMiddleware.log(
            logger, method: method, path: path, status: answer.status, elapsed: elapsed, firstByte: answer.firstByte, client: client)
        if let metrics {
            metrics.inFlight.decrement()
            metrics.recordRequest(route: answer.route, method: method, status: answer.status, duration: elapsed)
            if let firstByte = answer.firstByte { metrics.firstByteDuration(route: answer.route).record(firstByte) }
        }
    }

    deinit {
        finish()
    }
}
