// Refuses compressed request bodies with 415 instead of failing them as "not valid JSON".
internal import HTTPTypes
internal import Hummingbird

/// Request bodies must come uncompressed (`Content-Encoding` absent or `identity`). A gzip or
/// brotli body would otherwise reach the JSON decoder and fail as "not valid JSON", hiding the
/// actual cause; the answer is 415 naming the encoding, with `Accept-Encoding: identity` (RFC 7694).
struct ContentEncodingMiddleware: RouterMiddleware {
    typealias Context = GatehouseRequestContext

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        if let refusal = Self.refusal(contentEncoding: request.headers[.contentEncoding]) { throw refusal }
        return try await next(request, context)
    }

    /// The 415 for a request whose `Content-Encoding` is `value`; nil when the body is not encoded.
    static func refusal(contentEncoding value: String?) -> OpenAIError? {
        guard let value, YAMLReader.commaSeparated(value, isValid: { $0.lowercased() == "identity" }).invalid != nil else { return nil }
        return OpenAIError(
            .unsupportedMediaType,
            "request bodies must not be compressed (Content-Encoding: \(String(value.prefix(64)))); send the JSON uncompressed",
            code: "unsupported_content_encoding"
        ).with(.acceptEncoding, "identity")
    }
}
