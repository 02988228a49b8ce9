// Gives every request an id (the client's X-Request-ID or a new one) and echoes it back.
internal import Foundation
public import Hummingbird
internal import HTTPTypes

/// Honours a sane client `X-Request-ID`, otherwise generates one; sets it on the context,
/// on the logger (so every log line of the request carries it) and on the response.
public struct RequestIDMiddleware: RouterMiddleware {
    public typealias Context = GatehouseRequestContext
    public init() {}

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var context = context
        let id = request.headers[.requestID].flatMap { Self.isAcceptable($0) ? $0 : nil } ?? UUID().uuidString.lowercased()
        context.requestID = id
        context.logger[metadataKey: "request_id"] = .string(id)
        context.logger[metadataKey: "hb.request.id"] = nil
        // AccessLogMiddleware (next in line) turns every error into a response, so this sees
        // only responses.
        var response = try await next(request, context)
        response.headers[.requestID] = id
        return response
    }

    /// Ids are echoed into headers and logs: accept only short, printable, header-safe ones.
    static func isAcceptable(_ id: String) -> Bool {
        !id.isEmpty && id.utf8.count <= 128 && id.utf8.allSatisfy { $0 > 0x20 && $0 < 0x7f }
    }
}

extension HTTPField.Name {
    static let requestID = HTTPField.Name("X-Request-ID")!
}
