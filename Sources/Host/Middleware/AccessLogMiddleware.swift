// Every request's final word: errors become OpenAI-shaped JSON; one access-log line and metrics per request.
internal import Foundation
public import Hummingbird
internal import Logging
internal import NIOCore
internal import NIOHTTP1

/// The outermost gateway middleware after the request id: converts Hummingbird's own errors
/// (404 no route, 413 body too large, ...) and unexpected errors into OpenAI-shaped JSON,
/// writes one access-log line with method, path, status and latency, and counts the request
/// by route template in the metrics (its duration measured to the end of the body).
public struct AccessLogMiddleware: RouterMiddleware {
    public typealias Context = GatehouseRequestContext
    let metrics: GatehouseMetrics?

    init(metrics: GatehouseMetrics?) {
        self.metrics = metrics
    }

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let start = ContinuousClock.now
        metrics?.inFlight.increment()
        var response: Response
        do {
            response = try await next(request, context)
        } catch {
            response = Self.response(for: error, request: request, context: context)
        }
        Self.log(
            context.logger, method: request.method.rawValue, path: request.uri.path, status: response.status.code, elapsed: ContinuousClock.now - start,
            client: context.remoteAddress)
        if let metrics {
            let route = context.endpointPath ?? "unmatched"
            let method = request.method.rawValue
            let status = response.status.code
            let body = response.body
            response.body = ResponseBody(contentLength: body.contentLength) { writer in
                defer {
                    metrics.inFlight.decrement()
                    metrics.recordRequest(route: route, method: method, status: status, duration: ContinuousClock.now - start)
                }
                try await body.write(writer)
            }
        }
        return response
    }

    /// The access-log line of one request (also written by the chat pass-through, which passes
    /// `requestID` instead of keeping it in the logger's metadata). `client` is the client's
    /// address (behind trusted proxies, the one they forwarded).
    static func log(_ logger: Logger, method: String, path: String, status: Int, elapsed: Duration, requestID: String? = nil, client: String) {
        guard logger.logLevel <= .info else { return }
        if let handler = logger.handler as? JSONLogHandler {
            handler.logAccess(method: method, path: path, status: status, latency: elapsed, requestID: requestID, client: client)
            return
        }
        var metadata: Logger.Metadata = [
            "method": .string(method), "path": .string(path), "status": .stringConvertible(status),
            "latency_ms": .string(JSONLogHandler.milliseconds(elapsed)), "client": .string(client),
        ]
        if let requestID { metadata["request_id"] = .string(requestID) }
        logger.info("request", metadata: metadata)
    }

    /// The OpenAI-shaped response for any error thrown on the request path.
    static func response(for error: any Error, request: Request, context: Context) -> Response {
        switch error {
        case let error as OpenAIError:
            return error.response(requestID: context.requestID)
        case let error as HTTPError:
            return openAIError(for: error, request: request).response(requestID: context.requestID)
        case is NIOTooManyBytesError:
            return openAIError(for: HTTPError(.contentTooLarge), request: request).response(requestID: context.requestID)
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
            return OpenAIError(.contentTooLarge, "request body is larger than the configured limit", code: "body_too_large")
        case .methodNotAllowed:
            return OpenAIError(.methodNotAllowed, "\(request.method.rawValue) is not allowed on \(request.uri.path)", code: "method_not_allowed")
        default:
            var converted = OpenAIError(error.status, error.body ?? error.status.reasonPhrase)
            converted.headers = error.headers
            return converted
        }
    }
}
