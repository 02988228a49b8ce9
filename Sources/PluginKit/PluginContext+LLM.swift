// Asking the LLM from a Swift plugin: async/await over the ABI's llm_chat callbacks.
internal import FoundationEssentials
internal import PluginABI

/// One chat message.
public struct ChatMessage: Sendable, Codable, Equatable {
    public var role: String
    public var content: String

    public init(role: String, content: String) {
        self.role = role
        self.content = content
    }

    public static func system(_ content: String) -> ChatMessage { ChatMessage(role: "system", content: content) }
    public static func user(_ content: String) -> ChatMessage { ChatMessage(role: "user", content: content) }
    public static func assistant(_ content: String) -> ChatMessage { ChatMessage(role: "assistant", content: content) }
}

/// The LLM's answer: the assistant text and the token usage, plus the raw OpenAI JSON.
public struct LLMReply: Sendable {
    public let text: String
    public let promptTokens: Int
    public let completionTokens: Int
    public let finishReason: String?
    /// The OpenAI `chat.completion` object as the gateway produced it.
    public let json: [UInt8]
}

/// Why an LLM call failed: the status a client would have seen and a one-line reason.
public struct LLMError: Error, Sendable, CustomStringConvertible {
    /// The status the gateway would have answered a client with (400, 404, 429, 502, 504, ...).
    public let status: Int
    public let message: String
    /// The error's `code` as a client would get it, such as `model_not_found`,
    /// `upstream_rate_limited` or `context_length_exceeded` (nil from hosts before ABI 1.2).
    public var code: String? = nil
    /// The error's `type`, such as `invalid_request_error` (nil from hosts before ABI 1.2).
    public var type: String? = nil
    /// The request field at fault, when the error names one (`messages`, `model`, ...).
    public var param: String? = nil
    public var description: String { "LLM call failed (\(status)): \(message)" }
}

/// The OpenAI-style error body a 1.2 host sends with a failed call.
private struct ErrorBodyShape: Decodable {
    struct Body: Decodable {
        let code: String?
        let type: String?
        let param: String?
    }
    let error: Body
}

extension PluginContext {
    /// Asks the LLM through the gateway's own pipeline (backend, cache, timeouts, metrics
    /// attributed to this plugin). In a request-scoped context the call carries that request's id.
    ///
    /// ```swift
    /// let reply = try await context.chat(model: "llama3.2", messages: [.user("Say hi")], options: ["temperature": .number(0)])
    /// return PluginResponse(status: 200, body: Array(reply.text.utf8))
    /// ```
    /// - Parameters:
    ///   - model: the model name, as clients would send it.
    ///   - messages: the conversation.
    ///   - options: any other OpenAI request field (`temperature`, `max_tokens`, `tools`, ...).
    public func chat(model: String, messages: [ChatMessage], options: [String: JSONValue] = [:]) async throws -> LLMReply {
        try await chat(requestJSON: Self.requestJSON(model: model, messages: messages, options: options))
    }

    /// Asks the LLM with a complete OpenAI chat-completion request body.
    public func chat(requestJSON: [UInt8]) async throws -> LLMReply {
        try requireLLM()
        return try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<LLMReply, any Error>) in
            if let refused = startLLMCall(requestJSON, box: LLMCallBox(reply: continuation)) { continuation.resume(throwing: refused) }
        }
    }

    /// Streams the LLM's answer: each element is the text a chunk adds.
    ///
    /// ```swift
    /// for try await piece in context.chatStream(model: "llama3.2", messages: [.user("Count to 5")]) { print(piece) }
    /// ```
    public func chatStream(model: String, messages: [ChatMessage], options: [String: JSONValue] = [:]) -> AsyncThrowingStream<String, any Error> {
        let (stream, continuation) = AsyncThrowingStream<String, any Error>.makeStream()
        do {
            try requireLLM()
            let json = try Self.requestJSON(model: model, messages: messages, options: options)
            if let refused = startLLMCall(json, box: LLMCallBox(chunks: continuation)) { continuation.finish(throwing: refused) }
        } catch {
            continuation.finish(throwing: error)
        }
        return stream
    }

    /// Hands the call to the host; the box is released by the done callback, or here if the
    /// host refuses (then the returned error says why).
    private func startLLMCall(_ json: [UInt8], box: LLMCallBox) -> LLMError? {
        let context = Unmanaged.passRetained(box).toOpaque()
        let onChunk: gh_llm_chunk_fn? = box.chunks == nil ? nil : llmChunkThunk
        let status = json.withUnsafeBufferPointer { bytes in
            host.pointee.llm_chat(plugin, exchange, gh_bytes(data: bytes.baseAddress, len: bytes.count), onChunk, llmDoneThunk, context)
        }
        guard status != GH_OK else { return nil }
        Unmanaged<LLMCallBox>.fromOpaque(context).release()
        return LLMError(status: 500, message: "the host refused the call (status \(status.rawValue))")
    }

    private func requireLLM() throws {
        guard hostOffers(MemoryLayout<gh_host_api>.offset(of: \gh_host_api.llm_chat)!) else {
            throw LLMError(status: 501, message: "this host speaks ABI 1.0, which has no LLM service")
        }
    }

    /// True when the host's table is large enough to contain the field at `offset`.
    func hostOffers(_ offset: Int) -> Bool {
        Int(host.pointee.struct_size) >= offset + MemoryLayout<UnsafeRawPointer>.size
    }

    static func requestJSON(model: String, messages: [ChatMessage], options: [String: JSONValue]) throws -> [UInt8] {
        var object = options
        object["model"] = .string(model)
        object["messages"] = .array(messages.map { .object(["role": .string($0.role), "content": .string($0.content)]) })
        return Array(try JSONEncoder().encode(JSONValue.object(object)))
    }
}

/// What an LLM call's callbacks deliver to: a continuation for the reply, or a stream.
private final class LLMCallBox: @unchecked Sendable {
    let reply: CheckedContinuation<LLMReply, any Error>?
    let chunks: AsyncThrowingStream<String, any Error>.Continuation?

    init(reply: CheckedContinuation<LLMReply, any Error>) {
        self.reply = reply
        self.chunks = nil
    }

    init(chunks: AsyncThrowingStream<String, any Error>.Continuation) {
        self.reply = nil
        self.chunks = chunks
    }
}

private struct CompletionShape: Decodable {
    struct Choice: Decodable {
        struct Message: Decodable { let content: String? }
        let message: Message?
        let finish_reason: String?
    }

    struct Usage: Decodable {
        let prompt_tokens: Int?
        let completion_tokens: Int?
    }

    let choices: [Choice]?
    let usage: Usage?
}

private let llmChunkThunk: gh_llm_chunk_fn = { context, _, delta in
    guard let context else { return }
    let box = Unmanaged<LLMCallBox>.fromOpaque(context).takeUnretainedValue()
    if delta.len > 0 { box.chunks?.yield(String(delta)) }
}

private let llmDoneThunk: gh_llm_done_fn = { context, status, httpStatus, json, error in
    guard let context else { return }
    let box = Unmanaged<LLMCallBox>.fromOpaque(context).takeRetainedValue()
    guard status == GH_OK else {
        let details = json.len > 0 ? (try? JSONDecoder().decode(ErrorBodyShape.self, from: Data(Array(json))))?.error : nil
        let failure = LLMError(status: Int(httpStatus), message: String(error), code: details?.code, type: details?.type, param: details?.param)
        box.reply?.resume(throwing: failure)
        box.chunks?.finish(throwing: failure)
        return
    }
    let bytes = Array(json)
    guard let shape = try? JSONDecoder().decode(CompletionShape.self, from: Data(bytes)) else {
        let failure = LLMError(status: 502, message: "the host sent a completion that is not valid JSON")
        box.reply?.resume(throwing: failure)
        box.chunks?.finish(throwing: failure)
        return
    }
    let choice = shape.choices?.first
    box.reply?.resume(
        returning: LLMReply(
            text: choice?.message?.content ?? "", promptTokens: shape.usage?.prompt_tokens ?? 0,
            completionTokens: shape.usage?.completion_tokens ?? 0, finishReason: choice?.finish_reason, json: bytes))
    box.chunks?.finish()
}
