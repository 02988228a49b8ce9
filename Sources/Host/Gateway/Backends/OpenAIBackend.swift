// Any OpenAI-compatible upstream (llama.cpp server, vLLM, OpenAI): JSON passes through, SSE is re-framed.
internal import AsyncHTTPClient
internal import Foundation
internal import NIOCore
internal import NIOHTTP1

/// Forwards to an OpenAI-compatible server. Bodies pass through unchanged except for the
/// smoothing some servers need (llama.cpp rejects `content: null` next to `tool_calls`).
struct OpenAIBackend: ChatBackend {
    let client: UpstreamClient
    var name: String { "openai" }

    func complete(_ request: ChatRequest, requestID: String) async throws -> ChatCompletion {
        let response = try await client.send(.POST, "/v1/chat/completions", json: Self.upstreamBody(request, stream: false), requestID: requestID)
        let body = try await client.collect(response, path: "/v1/chat/completions")
        guard response.status == .ok else {
            throw UpstreamClient.upstreamStatusError(status: Int(response.status.code), body: body, backend: name)
        }
        let data = Data(body.readableBytesView)
        guard let reply = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw OpenAIError(.badGateway, "openai upstream sent a reply that is not a JSON object", code: "upstream_invalid")
        }
        let message = ((reply["choices"] as? [[String: Any]])?.first?["message"] as? [String: Any]) ?? [:]
        let usage = reply["usage"] as? [String: Any] ?? [:]
        return ChatCompletion(
            json: data, text: message["content"] as? String ?? "",
            promptTokens: usage["prompt_tokens"].flatMap(JSONNumbers.int) ?? 0,
            completionTokens: usage["completion_tokens"].flatMap(JSONNumbers.int) ?? 0)
    }

    func stream(_ request: ChatRequest, requestID: String) async throws -> AsyncThrowingStream<ChatStreamEvent, any Error> {
        let response = try await client.send(.POST, "/v1/chat/completions", json: Self.upstreamBody(request, stream: true), requestID: requestID)
        guard response.status == .ok else {
            let body = try await client.collect(response, path: "/v1/chat/completions")
            throw UpstreamClient.upstreamStatusError(status: Int(response.status.code), body: body, backend: name)
        }
        let client = self.client
        return AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    for try await payload in SSEDataEvents(NDJSONLines(response.body)) {
                        if payload == Self.done { break }
                        for event in try Self.events(for: payload, forwardUsage: request.includeUsage) { continuation.yield(event) }
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: client.map(error, path: "/v1/chat/completions"))
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    static let done = Data("[DONE]".utf8)
    private static let usageMarker = Data(#""usage":{"#.utf8)
    private static let spacedUsageMarker = Data(#""usage": {"#.utf8)
    private static let errorMarker = Data(#""error""#.utf8)

    /// Classifies one upstream SSE payload. Only payloads that carry usage or an error are
    /// parsed; ordinary chunks pass through as bytes. The usage-only chunk the gateway asked
    /// for is forwarded only if the client asked for it too.
    static func events(for payload: Data, forwardUsage: Bool) throws -> [ChatStreamEvent] {
        let hasUsage = payload.range(of: usageMarker) != nil || payload.range(of: spacedUsageMarker) != nil
        let hasError = payload.range(of: errorMarker) != nil
        guard hasUsage || hasError else { return [.chunk(payload)] }
        let object = (try? JSONSerialization.jsonObject(with: payload) as? [String: Any]) ?? [:]
        if let error = object["error"] {
            let message = (error as? [String: Any])?["message"] as? String ?? (error as? String) ?? "unknown error"
            throw OpenAIError(.badGateway, "openai upstream failed mid-stream: \(message)", code: "upstream_error")
        }
        var events: [ChatStreamEvent] = []
        let choices = object["choices"] as? [Any] ?? []
        if !choices.isEmpty || forwardUsage { events.append(.chunk(payload)) }
        if let usage = object["usage"] as? [String: Any] {
            events.append(.usage(prompt: usage["prompt_tokens"].flatMap(JSONNumbers.int) ?? 0, completion: usage["completion_tokens"].flatMap(JSONNumbers.int) ?? 0))
        }
        return events
    }

    func models(requestID: String) async throws -> Data {
        try await passThrough(.GET, "/v1/models", json: nil, requestID: requestID)
    }

    func embeddings(_ body: [String: Any], requestID: String) async throws -> Data {
        try await passThrough(.POST, "/v1/embeddings", json: OpenAIShapes.data(body), requestID: requestID)
    }

    func checkReady(requestID: String) async throws {
        let response = try await client.send(.GET, "/v1/models", requestID: requestID, timeout: 3)
        _ = try await client.collect(response, path: "/v1/models")
        guard response.status == .ok else { throw OpenAIError(.serviceUnavailable, "openai upstream answered HTTP \(response.status.code) to /v1/models") }
    }

    private func passThrough(_ method: HTTPMethod, _ path: String, json: Data?, requestID: String) async throws -> Data {
        let response = try await client.send(method, path, json: json, requestID: requestID)
        let body = try await client.collect(response, path: path)
        guard response.status == .ok else {
            throw UpstreamClient.upstreamStatusError(status: Int(response.status.code), body: body, backend: name)
        }
        return Data(body.readableBytesView)
    }

    /// The body sent upstream: the client's, with `stream` set, usage requested when streaming
    /// (so the gateway can count tokens), and `content: null` beside `tool_calls` sent as "".
    static func upstreamBody(_ request: ChatRequest, stream: Bool) -> Data {
        var body = request.body
        body["stream"] = stream
        if stream {
            var options = body["stream_options"] as? [String: Any] ?? [:]
            options["include_usage"] = true
            body["stream_options"] = options
        } else {
            body.removeValue(forKey: "stream_options")
        }
        body["messages"] = request.messages.map { message -> [String: Any] in
            guard message["tool_calls"] != nil, message["content"] == nil || message["content"] is NSNull else { return message }
            var smoothed = message
            smoothed["content"] = ""
            return smoothed
        }
        return OpenAIShapes.data(body)
    }
}

/// The `data:` payloads of a server-sent-event stream, one per `data:` line.
struct SSEDataEvents<Lines: AsyncSequence & Sendable>: AsyncSequence where Lines.Element == Data {
    typealias Element = Data
    let lines: Lines

    init(_ lines: Lines) { self.lines = lines }

    struct AsyncIterator: AsyncIteratorProtocol {
        var upstream: Lines.AsyncIterator

        mutating func next() async throws -> Data? {
            // NDJSONLines drops blank lines, so each data line is treated as one event; that is
            // what every OpenAI-compatible server sends (one JSON object per data line).
            while let line = try await upstream.next() {
                var text = line
                if text.last == 0x0d { text.removeLast() }
                guard text.starts(with: Array("data:".utf8)) else { continue }  // event:, id:, comments
                var payload = text.dropFirst(5)
                if payload.first == 0x20 { payload = payload.dropFirst() }
                return Data(payload)
            }
            return nil
        }
    }

    func makeAsyncIterator() -> AsyncIterator { AsyncIterator(upstream: lines.makeAsyncIterator()) }
}
