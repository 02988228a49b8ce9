// Turns every thrown error into an OpenAI-shaped JSON response, and logs each request once.
internal import Foundation
public import Hummingbird
internal import Logging
internal import NIOCore

/// The outermost gateway middleware after the request id: converts Hummingbird's own errors
/// (404 no route, 413 body too large, ...) and unexpected errors into OpenAI-shaped JSON,
/// then writes one access-log line with method, path, status and latency.
public struct ErrorMiddleware: RouterMiddleware {
    public typealias Context = GatehouseRequestContext
    public init() {}

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let start = ContinuousClock.now
        let response: Response
        do {
            response = try await next(request, context)
        } catch let error as OpenAIError {
            response = error.response(requestID: context.requestID)
        } catch let error as HTTPError {
            response = Self.openAIError(for: error, request: request).response(requestID: context.requestID)
        } catch is NIOTooManyBytesError {
            response = Self.openAIError(for: HTTPError(.contentTooLarge), request: request).response(requestID: context.requestID)
        } catch {
            context.logger.error("unhandled error", metadata: ["error": .string(String(describing: error))])
            response = OpenAIError(.internalServerError, "internal error: \(error)").response(requestID: context.requestID)
        }
        let elapsed = ContinuousClock.now - start
        let milliseconds = Double(elapsed.components.seconds) * 1000 + Double(elapsed.components.attoseconds) / 1e15
        context.logger.info(
            "request",
            metadata: [
                "method": .string(request.method.rawValue), "path": .string(request.uri.path),
                "status": .stringConvertible(response.status.code), "latency_ms": .string(String(format: "%.3f", milliseconds)),
            ])
        return response
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
