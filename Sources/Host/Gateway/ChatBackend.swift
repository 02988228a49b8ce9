// The contract every upstream kind implements, and the results the gateway passes around.
internal import Foundation
internal import NIOCore

/// A finished, non-streaming chat completion.
struct ChatCompletion: Sendable {
    /// The OpenAI-shaped `chat.completion` JSON to send to clients (and to plugins).
    var json: Data
    var promptTokens: Int
    var completionTokens: Int
}

/// One event of a streamed chat completion.
enum ChatStreamEvent: Sendable {
    /// An OpenAI `chat.completion.chunk` JSON object, ready to be sent as an SSE `data:` line.
    case chunk(Data)
    /// Token counts, when the upstream reports them (sent as a usage chunk if asked for).
    case usage(prompt: Int, completion: Int)
}

/// An LLM upstream: Ollama's native API or any OpenAI-compatible server.
protocol ChatBackend: Sendable {
    /// The backend's name in messages ("ollama", "openai").
    var name: String { get }

    func complete(_ request: ChatRequest, requestID: String) async throws -> ChatCompletion

    /// Starts a stream. Throws (before any event) if the upstream is unreachable or refuses,
    /// so the client gets a proper error status instead of an empty 200.
    func stream(_ request: ChatRequest, requestID: String) async throws -> AsyncThrowingStream<ChatStreamEvent, any Error>

    /// `POST /v1/completions` (legacy text completions), whole: `json` is OpenAI's `text_completion`.
    func textCompletion(_ request: TextCompletionRequest, requestID: String) async throws -> ChatCompletion

    /// `POST /v1/completions` streamed: `text_completion` chunks, then usage. Throws before any
    /// event if the upstream is unreachable or refuses, as `stream` does.
    func textCompletionStream(_ request: TextCompletionRequest, requestID: String) async throws -> AsyncThrowingStream<ChatStreamEvent, any Error>

    /// `GET /v1/models` in OpenAI's shape.
    func models(requestID: String) async throws -> Data

    /// `POST /v1/embeddings` in OpenAI's shape.
    func embeddings(_ body: [String: Any], requestID: String) async throws -> Data

    /// Throws a one-line reason when the upstream cannot serve.
    func checkReady(requestID: String) async throws
}

/// Shared helpers for building OpenAI-shaped JSON.
enum OpenAIShapes {
    static func completionID() -> String { "chatcmpl-" + uniqueHex() }

    static func textCompletionID() -> String { "cmpl-" + uniqueHex() }

    /// 24 hex digits, unique in the process and unpredictable across processes (from the request
    /// id generator: Foundation's `UUID()` costs system calls per id).
    private static func uniqueHex() -> Substring {
        RequestIDGenerator.next().filter { $0 != "-" }.prefix(24)
    }

    static func now() -> Int { Int(Date().timeIntervalSince1970) }

    static func data(_ object: [String: Any]) -> Data {
        JSONText.data(object)
    }

    /// A JSON value as it would be written, for error messages (`"extreme"`, `3`, `true`).
    static func describe(_ value: Any) -> String {
        if let text = value as? String { return "\"\(text)\"" }
        if let flag = JSONNumbers.bool(value) { return flag ? "true" : "false" }
        if let data = try? JSONSerialization.data(withJSONObject: value, options: [.fragmentsAllowed, .sortedKeys]) {
            return String(decoding: data, as: UTF8.self)
        }
        return String(describing: value)
    }

    static func usage(prompt: Int, completion: Int) -> [String: Any] {
        ["prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion]
    }

    /// A final usage-only chunk, as OpenAI sends when `stream_options.include_usage` is set.
    static func usageChunk(id: String, model: String, created: Int, prompt: Int, completion: Int, object: String = "chat.completion.chunk") -> Data {
        data([
            "id": id, "object": object, "created": created, "model": model, "choices": [Any](),
            "usage": usage(prompt: prompt, completion: completion),
        ])
    }
}

/// Turns an upstream body into chat events pulled on demand by the consumer's own task: no
/// producer task, no buffer, and no thread hand-off per chunk (which cost about half of the
/// streamed throughput when a task fed an AsyncThrowingStream).
final class EventPump<Upstream: AsyncIteratorProtocol & SendableMetatype>: @unchecked Sendable {
    /// The events one upstream element becomes, and whether it was the last.
    typealias Transform = (Upstream.Element) throws -> (events: [ChatStreamEvent], isLast: Bool)

    private var upstream: Upstream
    private var pending: ArraySlice<ChatStreamEvent> = []
    private var finished = false
    private let transform: Transform
    private let mapError: (any Error) -> any Error
    private let onFinish: (() -> Void)?
    private let onFailure: ((any Error) -> Void)?
    private let endedEarly: (_ elementsSeen: Int) -> (any Error)?
    private var elementsSeen = 0

    /// - Parameters:
    ///   - mapError: turns transport errors into gateway errors.
    ///   - onFailure: called once when the stream fails (with the error as thrown, before `mapError`).
    ///   - onFinish: called once when the stream ends normally.
    ///   - endedEarly: the error to end with when the upstream ends before an element the
    ///     transform marked last (given how many elements came), or nil to end normally.
    init(
        _ upstream: Upstream, mapError: @escaping (any Error) -> any Error, onFailure: ((any Error) -> Void)? = nil,
        onFinish: (() -> Void)? = nil, endedEarly: @escaping (_ elementsSeen: Int) -> (any Error)?, transform: @escaping Transform
    ) {
        self.upstream = upstream
        self.transform = transform
        self.mapError = mapError
        self.onFailure = onFailure
        self.onFinish = onFinish
        self.endedEarly = endedEarly
    }

    /// Consumed by one task at a time (AsyncThrowingStream's unfolding contract).
    func next() async throws -> ChatStreamEvent? {
        while pending.isEmpty {
            if finished { return nil }
            do {
                guard let element = try await upstream.next() else {
                    if let error = endedEarly(elementsSeen) { throw error }
                    finish()
                    return nil
                }
                elementsSeen += 1
                let (events, isLast) = try transform(element)
                pending = events[...]
                if isLast { finish() }
            } catch {
                finished = true
                onFailure?(error)
                throw mapError(error)
            }
        }
        return pending.popFirst()
    }

    private func finish() {
        guard !finished else { return }
        finished = true
        onFinish?()
    }

    var stream: AsyncThrowingStream<ChatStreamEvent, any Error> {
        AsyncThrowingStream(unfolding: { try await self.next() })
    }
}
