// Unit tests for the refusals made before any route runs: 405 with Allow, 415 for compressed bodies, faulty HTTP/1.0 framing.
import Hummingbird
import NIOHTTP1
import Testing

@testable import Host

@Suite struct RequestRefusalTests {
    private func middleware() -> MethodNotAllowedMiddleware {
        let router = Router(context: GatehouseRequestContext.self)
        router.post("/v1/chat/completions") { _, _ in "chat" }
        router.get("/v1/models") { _, _ in "list" }
        router.get("/v1/models/**") { _, _ in "one" }
        router.get("/v1/plugins/:name") { _, _ in "plugin" }
        for method in [HTTPRequest.Method.get, .post] { router.on("/v1/plugins/:name/**", method: method) { _, _ in "route" } }
        router.head("/only-head") { _, _ in "" }
        return MethodNotAllowedMiddleware(routes: router.routes)
    }

    @Test func allowedMethodsAreThoseOfEveryRouteMatchingThePath() {
        let routes = middleware()
        #expect(routes.allowedMethods(for: "/v1/chat/completions") == [.post])
        // GET brings HEAD, which the router generates.
        #expect(routes.allowedMethods(for: "/v1/models") == [.get, .head])
        #expect(routes.allowedMethods(for: "/v1/models/hf.co/org/repo:Q4_K_M") == [.get, .head])
        #expect(routes.allowedMethods(for: "/v1/plugins/echo") == [.get, .head])
        #expect(routes.allowedMethods(for: "/v1/plugins/echo/deep/path") == [.get, .head, .post])
        #expect(routes.allowedMethods(for: "/only-head") == [.head])
        // Trailing slashes are no different path to the router.
        #expect(routes.allowedMethods(for: "/v1/chat/completions/") == [.post])
        for unknown in ["/", "/v1", "/v1/chat", "/v1/chat/completions/extra", "/v1/chat/completion", "/v1/plugins"] {
            #expect(routes.allowedMethods(for: unknown).isEmpty, "\(unknown)")
        }
    }

    @Test func onlyAnIdentityContentEncodingIsAccepted() throws {
        #expect(ContentEncodingMiddleware.refusal(contentEncoding: nil) == nil)
        #expect(ContentEncodingMiddleware.refusal(contentEncoding: "identity") == nil)
        #expect(ContentEncodingMiddleware.refusal(contentEncoding: " Identity ,identity") == nil)
        for encoded in ["gzip", "br", "deflate", "identity, gzip", "x-custom"] {
            let refusal = try #require(ContentEncodingMiddleware.refusal(contentEncoding: encoded), "\(encoded)")
            #expect(refusal.status == .unsupportedMediaType && refusal.code == "unsupported_content_encoding")
            #expect(refusal.headers[.acceptEncoding] == "identity")
            #expect(refusal.message.contains("(Content-Encoding: \(encoded))"))
        }
    }

    @Test func headsTheParserTakesThoughFaultyAreRefused() {
        func head(_ version: HTTPVersion, _ fields: [(String, String)]) -> HTTPRequestHead {
            HTTPRequestHead(version: version, method: .POST, uri: "/v1/chat/completions", headers: HTTPHeaders(fields))
        }
        #expect(MalformedRequest(head: head(.http1_0, [("Transfer-Encoding", "chunked")])) == .transferEncodingInHTTP10)
        #expect(MalformedRequest(head: head(.http1_0, [("transfer-encoding", "gzip, chunked"), ("Content-Length", "5")])) == .transferEncodingInHTTP10)
        #expect(MalformedRequest(head: head(.http1_1, [("Host", "g"), ("Transfer-Encoding", "chunked")])) == nil)
        #expect(MalformedRequest(head: head(.http1_0, [("Content-Length", "5")])) == nil)
        // Exactly one Host in HTTP/1.1 (none is fine in 1.0); never two (RFC 9112 §3.2).
        #expect(MalformedRequest(head: head(.http1_1, [("Content-Length", "5")])) == .hostMissingOrRepeated)
        #expect(MalformedRequest(head: head(.http1_1, [("Host", "a"), ("hOsT", "b")])) == .hostMissingOrRepeated)
        #expect(MalformedRequest(head: head(.http1_0, [("Host", "a"), ("Host", "a")])) == .hostMissingOrRepeated)
        #expect(MalformedRequest(head: head(.http1_1, [("HOST", "a"), ("X-Host", "b")])) == nil)
        #expect(OpenAIError.malformedRequest(.transferEncodingInHTTP10).status == .badRequest)
        // A transfer coding besides chunked, in any field, is not understood (RFC 9112 §6.1: 501).
        for codings in ["gzip, chunked", "identity,chunked", "x-custom ,\tchunked"] {
            #expect(MalformedRequest(head: head(.http1_1, [("Host", "g"), ("Transfer-Encoding", codings)])) == .unsupportedTransferCoding, "\(codings)")
        }
        #expect(MalformedRequest(head: head(.http1_1, [("Host", "g"), ("Transfer-Encoding", "gzip"), ("transfer-encoding", "chunked")])) == .unsupportedTransferCoding)
        #expect(MalformedRequest(head: head(.http1_1, [("Host", "g"), ("Transfer-Encoding", "Chunked , ")])) == nil)
        #expect(OpenAIError.malformedRequest(.unsupportedTransferCoding).status == .notImplemented)
    }
}
