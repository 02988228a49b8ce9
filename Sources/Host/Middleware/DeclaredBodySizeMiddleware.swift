// Answers 413 at once to a request whose declared body is over the limit, before any of it is read.
internal import HTTPTypes
internal import Hummingbird

/// A request that declares (`Content-Length`) a body over `server.max_body_bytes` is refused
/// from its head, as the chat pass-through refuses its requests: reading up to the limit first
/// would hold the connection, and the memory, for a body that is refused anyway. A client that
/// sent `Expect: 100-continue` gets no `100` (HTTP1SemanticsHandler), so it waits for this answer
/// instead of the route's, which would come only after it gave up waiting (curl: 1 s).
/// HTTP1SemanticsHandler closes the connection after the 413, lingering while the client may
/// still be sending the body. A chunked body is measured as it is read (the route's 413).
struct DeclaredBodySizeMiddleware: RouterMiddleware {
    typealias Context = GatehouseRequestContext

    let maxBodyBytes: Int

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        if let length = request.headers[.contentLength].flatMap(Int.init), length > maxBodyBytes {
            throw OpenAIError.bodyTooLarge
        }
        return try await next(request, context)
    }
}
