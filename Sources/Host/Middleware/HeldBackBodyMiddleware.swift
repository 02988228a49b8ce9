// Answers 413 at once to a request whose client holds back, for a `100 Continue`, a body declared over the limit.
internal import HTTPTypes
internal import Hummingbird

/// A client that sends `Expect: 100-continue` waits for the `100` before sending its body. When
/// the body it declares is over `server.max_body_bytes`, no `100` is sent (HTTP1SemanticsHandler),
/// so the route reading the body would wait for the client to give up waiting (curl: 1 s) and
/// then read up to the limit before refusing it. This answers the 413 at once instead, and
/// HTTP1SemanticsHandler closes the connection after it, since the body was never sent. (The
/// chat pass-through does the same for its requests.)
struct HeldBackBodyMiddleware: RouterMiddleware {
    typealias Context = GatehouseRequestContext

    let maxBodyBytes: Int

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        // HTTP1SemanticsHandler has judged the expectation (`HTTPRequestHead.expectsContinue`) and
        // removed every `Expect` but that of a client waiting for a 100.
        if request.headers[.expect] != nil, let length = request.headers[.contentLength].flatMap(Int.init), length > maxBodyBytes {
            throw OpenAIError.bodyTooLarge
        }
        return try await next(request, context)
    }
}
