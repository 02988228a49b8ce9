// A validated legacy text-completion request (POST /v1/completions), kept as JSON so unknown fields pass through.
internal import Foundation
internal import NIOCore

/// The client's `/v1/completions` body, checked for the fields the gateway relies on. Older
/// tools (and code-completion plugins, with `suffix`) still use this endpoint.
struct TextCompletionRequest: @unchecked Sendable {
    /// The whole request object as the client sent it (JSON-compatible Foundation values).
    var body: [String: Any]
    var model: String
    var stream: Bool
    /// `stream_options.include_usage`: the client wants a final usage chunk.
    var includeUsage: Bool

    /// - Throws: `OpenAIError` 400 naming the field that is wrong.
    static func parse(_ buffer: ByteBuffer) throws -> TextCompletionRequest {
        try TextCompletionRequest(body: RequestFields.object(buffer))
    }

    init(body: [String: Any]) throws {
        model = try RequestFields.model(body)
        // Its form (a string, or lists of strings or tokens) is the backend's to accept.
        guard let prompt = body["prompt"], !(prompt is NSNull) else {
            throw RequestFields.missing("prompt")
        }
        try RequestFields.checkPositiveInteger(body, "max_tokens")
        self.body = body
        stream = try RequestFields.stream(body)
        includeUsage = RequestFields.includeUsage(body)
    }
}
