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
        guard let object = try? JSONSerialization.jsonObject(with: Data(buffer.readableBytesView)) else {
            throw OpenAIError(.badRequest, "request body is not valid JSON", code: "invalid_json")
        }
        guard let body = object as? [String: Any] else { throw OpenAIError(.badRequest, "request body must be a JSON object", code: "invalid_json") }
        return try TextCompletionRequest(body: body)
    }

    init(body: [String: Any]) throws {
        guard let model = body["model"] as? String, !model.isEmpty else {
            throw body["model"] == nil
                ? OpenAIError(.badRequest, "missing required field 'model'", code: "missing_model")
                : OpenAIError(.badRequest, "'model' must be a non-empty string", code: "invalid_model")
        }
        // Its form (a string, or lists of strings or tokens) is the backend's to accept.
        guard let prompt = body["prompt"], !(prompt is NSNull) else {
            throw OpenAIError(.badRequest, "missing required field 'prompt'", code: "missing_prompt")
        }
        if let value = body["max_tokens"], !(value is NSNull) {
            guard let count = JSONNumbers.int(value), count > 0 else {
                throw OpenAIError(.badRequest, "'max_tokens' must be a positive integer", code: "invalid_max_tokens")
            }
        }
        if let value = body["stream"], !(value is NSNull), JSONNumbers.bool(value) == nil {
            throw OpenAIError(.badRequest, "'stream' must be true or false", code: "invalid_stream")
        }
        self.body = body
        self.model = model
        stream = body["stream"].flatMap(JSONNumbers.bool) ?? false
        includeUsage = ((body["stream_options"] as? [String: Any])?["include_usage"]).flatMap(JSONNumbers.bool) ?? false
    }
}
