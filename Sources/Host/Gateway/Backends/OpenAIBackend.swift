// Any OpenAI-compatible upstream (llama.cpp server, vLLM, OpenAI): JSON passes through, SSE is re-framed.
internal import AsyncHTTPClient
internal import Foundation
internal import NIOCore
internal import NIOHTTP1
#if canImport(Glibc)
internal import Glibc
#endif

/// Forwards to an OpenAI-compatible server. Bodies pass through unchanged except for the
/// smoothing some servers need (llama.cpp rejects `content: null` next to `tool_calls`).
struct OpenAIBackend: ChatBackend {
    let client: UpstreamClient
    /// Put between the upstream URL and each route (`/v1`, or nothing: `Upstream.openAIAPIPath`).
    let apiPath: String
    var name: String { "openai" }

    init(client: UpstreamClient, apiPath: String = "/v1") {
        self.client = client
        self.apiPath = apiPath
    }

    func complete(_ request: ChatRequest, requestID: String) async throws -> ChatCompletion {
        let body = try await client.call(
            .POST, apiPath + "/chat/completions", json: Self.upstreamBody(request, stream: false), requestID: requestID, backend: name)
        return try Self.completion(from: body, masking: client.secrets)
    }

    /// A 200 reply as a completion. The JSON passes through untouched; only the token counts
    /// are read, by a scan rather than a full decode (which cost more than the rest of the
    /// proxying).
    /// - Throws: 502 when the reply is not a whole answer (`tokenCounts(inReply:masking:)`).
    static func completion(from body: ByteBuffer, masking secrets: SecretMask) throws -> ChatCompletion {
        try body.withUnsafeReadableBytes { bytes in
            let tokens = try tokenCounts(inReply: bytes, masking: secrets)
            return ChatCompletion(json: Data(bytes), promptTokens: tokens.prompt, completionTokens: tokens.completion)
        }
    }

    /// The usage of a 200 reply, read by a scan, once the reply is known to be a whole answer.
    /// - Throws: 502 when it is not one, which SDKs retry, rather than a 200 they cannot read:
    ///   not a JSON object; not valid JSON (a body cut short where the upstream closed the
    ///   connection, having sent no length); an error object sent with the 200, as some servers
    ///   and proxies do (`upstream_error`, in the upstream's words, `secrets` masked); or
    ///   no `choices`.
    static func tokenCounts(inReply bytes: UnsafeRawBufferPointer, masking secrets: SecretMask) throws -> (prompt: Int, completion: Int) {
        guard bytes.first(where: { $0 != 0x20 && $0 != 0x0a && $0 != 0x0d && $0 != 0x09 }) == UInt8(ascii: "{") else {
            throw OpenAIError(.badGateway, "openai upstream sent a reply that is not a JSON object", code: "upstream_invalid")
        }
        // The usual reply is settled in one strict pass; anything else is decoded to say what it is.
        if ByteSearch.find(choicesKey, in: bytes) == nil || !JSONSyntax.isValid(bytes) { try refuseIncompleteAnswer(bytes, masking: secrets) }
        return (JSONScan.integer(afterQuoted: promptTokensKey, in: bytes) ?? 0, JSONScan.integer(afterQuoted: completionTokensKey, in: bytes) ?? 0)
    }

    /// Throws the 502 for a 200 reply that is not a whole answer; returns for one that is after
    /// all: JSON the strict scan leaves to the decoder (a number past its length limit), or what
    /// no strict decoder takes but clients read (Python's json, the SDK's, takes a lone
    /// surrogate escape or `-Infinity`), as long as it is whole and has its `choices`.
    private static func refuseIncompleteAnswer(_ bytes: UnsafeRawBufferPointer, masking secrets: SecretMask) throws {
        guard let object = (try? JSONSerialization.jsonObject(with: Data(bytes))) as? [String: Any] else {
            if JSONStructure.isWhole(bytes), ByteSearch.find(choicesKey, in: bytes) != nil { return }
            throw OpenAIError(
                .badGateway, "openai upstream sent a reply that is not valid JSON (cut short, or malformed)", code: "upstream_invalid")
        }
        if let error = object["error"], !(error is NSNull) {
            // Decoded once: the message is read from the object at hand, else the body's text.
            let message = UpstreamClient.upstreamError(in: object)?.message ?? UpstreamClient.upstreamError(ByteBuffer(bytes: bytes)).message ?? "no message"
            throw secrets.masked(OpenAIError(.badGateway, "openai failed (an error sent with HTTP 200): \(message)", code: "upstream_error"))
        }
        guard object["choices"] is [Any] else {
            throw OpenAIError(.badGateway, "openai upstream sent a reply without 'choices'", code: "upstream_invalid")
        }
    }

    func stream(_ request: ChatRequest, requestID: String) async throws -> AsyncThrowingStream<ChatStreamEvent, any Error> {
        let path = apiPath + "/chat/completions"
        let body = try await client.openStream(path, json: Self.upstreamBody(request, stream: true), requestID: requestID, backend: name)
        return relay(body, path: path, forwardUsage: request.includeUsage)
    }

    /// An upstream SSE body as events: chunks pass through as bytes, usage and errors are read.
    private func relay(_ body: DeadlineBody<HTTPClientResponse.Body>, path: String, forwardUsage: Bool) -> AsyncThrowingStream<ChatStreamEvent, any Error> {
        let client = self.client
        return EventPump(
            SSEDataEvents(NDJSONLines(body)).makeAsyncIterator(), mapError: { client.map($0, path: path) },
            endedEarly: { eventsSeen in
                // Events without [DONE] are a complete answer from a lax server; none at all is not one.
                eventsSeen > 0 ? nil : OpenAIError(.badGateway, "openai upstream ended the stream without sending any event", code: "upstream_invalid")
            }
        ) { payload in
            payload == Self.done ? ([], true) : (try Self.events(for: payload, forwardUsage: forwardUsage), false)
        }.stream
    }

    static let done = Data("[DONE]".utf8)
    private static let choicesKey = Array(#""choices""#.utf8)
    private static let promptTokensKey = Array(#""prompt_tokens""#.utf8)
    private static let completionTokensKey = Array(#""completion_tokens""#.utf8)

    /// Classifies one upstream SSE payload. Only payloads that carry usage or an error are
    /// parsed; ordinary chunks pass through as bytes. The usage-only chunk the gateway asked
    /// for is forwarded only if the client asked for it too.
    static func events(for payload: Data, forwardUsage: Bool) throws -> [ChatStreamEvent] {
        guard payload.withUnsafeBytes(needsParsing) else { return [.chunk(payload)] }
        let object = (try? JSONSerialization.jsonObject(with: payload) as? [String: Any]) ?? [:]
        if let error = object["error"], !(error is NSNull) {  // `"error": null` on a chunk says there is none
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

    /// Whether a payload may carry usage (`"usage": {`) or an error (`"error"`), and so must
    /// be parsed; every other chunk passes through as bytes. A few `memmem` passes: this runs for
    /// every streamed token. True for a span of payloads if it is true for any one of them, so a
    /// relay may ask once per read before asking per payload.
    static func needsParsing(_ payload: UnsafeRawBufferPointer) -> Bool {
        if ByteSearch.find(errorKey, in: payload) != nil { return true }
        var from = 0
        while from < payload.count, let hit = ByteSearch.find(usageKey, in: UnsafeRawBufferPointer(rebasing: payload[from...])) {
            var index = from + hit + usageKey.count
            while index < payload.count, payload[index] == UInt8(ascii: " ") { index += 1 }
            if index < payload.count, payload[index] == UInt8(ascii: ":") {
                index += 1
                while index < payload.count, payload[index] == UInt8(ascii: " ") { index += 1 }
                if index < payload.count, payload[index] == UInt8(ascii: "{") { return true }
            }
            from += hit + 1
        }
        return false
    }

    private static let usageKey = Array(#""usage""#.utf8)
    private static let errorKey = Array(#""error""#.utf8)

    func textCompletion(_ request: TextCompletionRequest, requestID: String) async throws -> ChatCompletion {
        var body = request.body
        body["stream"] = false
        body.removeValue(forKey: "stream_options")
        return try Self.completion(
            from: try await client.call(.POST, apiPath + "/completions", json: OpenAIShapes.data(body), requestID: requestID, backend: name),
            masking: client.secrets)
    }

    /// Passed through as chat streams are: chunks as bytes, usage read where it is sent.
    func textCompletionStream(_ request: TextCompletionRequest, requestID: String) async throws -> AsyncThrowingStream<ChatStreamEvent, any Error> {
        var body = request.body
        body["stream"] = true
        var options = body["stream_options"] as? [String: Any] ?? [:]
        options["include_usage"] = true
        body["stream_options"] = options
        let path = apiPath + "/completions"
        let upstream = try await client.openStream(path, json: OpenAIShapes.data(body), requestID: requestID, backend: name)
        return relay(upstream, path: path, forwardUsage: request.includeUsage)
    }

    func models(requestID: String) async throws -> Data {
        let path = apiPath + "/models"
        return try Self.listReply(try await client.call(.GET, path, requestID: requestID, backend: name), from: path)
    }

    func embeddings(_ body: [String: Any], requestID: String) async throws -> Data {
        let path = apiPath + "/embeddings"
        return try Self.listReply(try await client.call(.POST, path, json: OpenAIShapes.data(body), requestID: requestID, backend: name), from: path)
    }

    /// A 200 list reply (`/v1/models`, `/v1/embeddings`), passed on as it came once it is seen
    /// to be one: a JSON object with a `data` list.
    /// - Throws: 502 naming the path, never a 200 that is not an answer.
    static func listReply(_ body: ByteBuffer, from path: String) throws(OpenAIError) -> Data {
        let data = Data(body.readableBytesView)
        guard ((try? JSONSerialization.jsonObject(with: data)) as? [String: Any])?["data"] is [Any] else {
            throw OpenAIError(.badGateway, "openai upstream sent a \(path) reply that is not a JSON object with a 'data' list", code: "upstream_invalid")
        }
        return data
    }

    func checkReady(requestID: String) async throws {
        _ = try await client.call(.GET, apiPath + "/models", requestID: requestID, backend: name, timeout: 3)
    }

    /// The body sent upstream: the client's, with `stream` set, usage requested when streaming
    /// (so the gateway can count tokens), and `content: null` beside `tool_calls` sent as "".
    /// When the client's own JSON text needs none of that (or only fields added at the front),
    /// it is forwarded as is: re-serialising costs more than the rest of the proxying.
    static func upstreamBody(_ request: ChatRequest, stream: Bool) -> Data {
        if let raw = request.raw, let forwarded = forwardable(raw, request: request, stream: stream) { return forwarded }
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
            guard needsSmoothing(message) else { return message }
            var smoothed = message
            smoothed["content"] = ""
            return smoothed
        }
        return OpenAIShapes.data(body)
    }
}

extension OpenAIBackend {
    /// The client's bytes, possibly with fields spliced in after the opening brace, or nil when
    /// the request must be rebuilt (a field to remove or rewrite, a message to smooth).
    static func forwardable(_ raw: Data, request: ChatRequest, stream: Bool) -> Data? {
        guard !request.messages.contains(where: needsSmoothing) else { return nil }
        let clientStream = request.body["stream"].flatMap(JSONNumbers.bool)
        var prefix = ""
        if stream {
            if clientStream == false { return nil }
            if clientStream == nil { prefix += #""stream":true,"# }
            if let options = request.body["stream_options"] {
                guard let include = (options as? [String: Any])?["include_usage"], JSONNumbers.bool(include) == true else { return nil }
            } else {
                prefix += Self.usageRequest
            }
        } else if clientStream == true || request.body["stream_options"] != nil {
            return nil
        }
        guard !prefix.isEmpty else { return raw }
        guard let brace = raw.firstIndex(of: UInt8(ascii: "{")) else { return nil }
        var spliced = Data(raw[...brace])
        spliced.append(contentsOf: prefix.utf8)
        spliced.append(contentsOf: raw[raw.index(after: brace)...])
        return spliced
    }

    /// The members spliced into a streamed request that lacks `stream_options`, so the
    /// upstream reports usage and the gateway can count the stream's tokens.
    static let usageRequest = #""stream_options":{"include_usage":true},"#

    /// llama.cpp rejects `content: null` (or missing) beside `tool_calls`.
    static func needsSmoothing(_ message: [String: Any]) -> Bool {
        message["tool_calls"] != nil && (message["content"] == nil || message["content"] is NSNull)
    }
}

/// Reads one integer field out of JSON text without decoding the rest.
enum JSONScan {
    /// The integer value of the first `"key": <digits>` in `data`, if any.
    static func integer(after key: String, in data: Data) -> Int? {
        data.withUnsafeBytes { integer(after: key, in: $0) }
    }

    static func integer(after key: String, in data: UnsafeRawBufferPointer) -> Int? {
        integer(afterQuoted: Array("\"\(key)\"".utf8), in: data)
    }

    /// The same, for a key already quoted (`"key"` as bytes), which hot paths keep in a constant.
    static func integer(afterQuoted needle: [UInt8], in data: UnsafeRawBufferPointer) -> Int? {
        guard let offset = ByteSearch.find(needle, in: data) else { return nil }
        var index = offset + needle.count
        while index < data.endIndex, data[index] == 0x20 || data[index] == UInt8(ascii: ":") { index += 1 }
        var value = 0
        var digits = 0
        while index < data.endIndex, (0x30...0x39).contains(data[index]), digits < 18 {
            value = value * 10 + Int(data[index] - 0x30)
            digits += 1
            index += 1
        }
        return digits > 0 ? value : nil
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
