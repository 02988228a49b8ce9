// Ollama's native API (/api/chat NDJSON streaming, /api/tags, /api/embed) translated to and from OpenAI's.
internal import AsyncHTTPClient
internal import Foundation
internal import NIOCore
internal import NIOHTTP1
internal import Synchronization

/// Talks to Ollama natively. Ollama streams NDJSON (one JSON object per line), not SSE; each line
/// becomes one OpenAI `chat.completion.chunk`. Token counts come from `prompt_eval_count` and
/// `eval_count`. A reasoning model's thinking (`message.thinking`) comes out as `reasoning` in
/// messages and deltas, and `reasoning_effort` becomes `think`, as Ollama's own `/v1` maps them.
struct OllamaBackend: ChatBackend {
    let client: UpstreamClient
    var name: String { "ollama" }

    func complete(_ request: ChatRequest, requestID: String) async throws -> ChatCompletion {
        let reply = try Self.replyObject(
            try await client.call(.POST, "/api/chat", json: Self.translate(request, stream: false), requestID: requestID, backend: name),
            masking: client.secrets)
        // Ollama's whole chat reply always has its message (empty content while a model loads).
        guard let message = reply["message"] as? [String: Any] else {
            throw OpenAIError(.badGateway, "ollama sent a chat reply without a message", code: "upstream_invalid")
        }
        let text = message["content"] as? String ?? ""
        var toolCalls = Self.openAIToolCalls(message["tool_calls"])
        if try Self.singleToolCall(request.body) { toolCalls = Array(toolCalls.prefix(1)) }
        let (prompt, completion) = Self.tokenCounts(reply)
        var assistant: [String: Any] = ["role": "assistant", "content": text]
        if let thinking = message["thinking"] as? String, !thinking.isEmpty { assistant["reasoning"] = thinking }
        if !toolCalls.isEmpty { assistant["tool_calls"] = toolCalls }
        let json = OpenAIShapes.data([
            "id": OpenAIShapes.completionID(), "object": "chat.completion", "created": OpenAIShapes.now(),
            "model": reply["model"] as? String ?? request.model,
            "choices": [
                [
                    "index": 0, "message": assistant, "finish_reason": Self.finishReason(reply, hasToolCalls: !toolCalls.isEmpty),
                    "logprobs": Self.chatLogprobs(reply["logprobs"]).map { ["content": $0] as Any } ?? NSNull(),
                ]
            ],
            "usage": OpenAIShapes.usage(prompt: prompt, completion: completion),
        ])
        return ChatCompletion(json: json, promptTokens: prompt, completionTokens: completion)
    }

    func stream(_ request: ChatRequest, requestID: String) async throws -> AsyncThrowingStream<ChatStreamEvent, any Error> {
        let body = try await client.openStream("/api/chat", json: Self.translate(request, stream: true), requestID: requestID, backend: name)
        let id = OpenAIShapes.completionID()
        let created = OpenAIShapes.now()
        let translator = StreamTranslator(
            id: id, created: created, model: request.model, includeUsage: request.includeUsage,
            maxToolCalls: try Self.singleToolCall(request.body) ? 1 : nil)
        return events(body, path: "/api/chat") { line in (translator.events(for: line), Self.isDone(line)) }
    }

    // MARK: Ollama's replies

    /// A whole reply as a JSON object.
    /// - Throws: 502 when it is not one, or when it is Ollama's `{"error": …}` (sent with a 200),
    ///   its words passed on with the upstream key masked (an upstream may quote the key back).
    static func replyObject(_ body: ByteBuffer, masking secrets: SecretMask) throws -> [String: Any] {
        guard let reply = try? JSONSerialization.jsonObject(with: Data(body.readableBytesView)) as? [String: Any] else {
            throw OpenAIError(.badGateway, "ollama sent a reply that is not a JSON object", code: "upstream_invalid")
        }
        if let error = errorText(reply["error"]) { throw secrets.masked(OpenAIError(.badGateway, "ollama failed: \(error)", code: "upstream_error")) }
        return reply
    }

    /// The text of a reply's `error` member: Ollama's is a string; an object's `message` (as
    /// OpenAI-minded servers and proxies write it) or its JSON. Nil when absent or null.
    static func errorText(_ error: Any?) -> String? {
        switch error {
        case nil, is NSNull: nil
        case let text as String: text
        case let object as [String: Any]: object["message"] as? String ?? String(decoding: JSONText.data(object), as: UTF8.self)
        case let other?: "\(other)"
        }
    }

    /// An NDJSON stream (`/api/chat`, `/api/generate`) as events: each line a JSON object, given
    /// to `transform` (which says whether it was the last), Ollama's mid-stream `{"error": …}`
    /// thrown, and a stream without its `"done": true` line reported as cut short.
    private func events(
        _ body: DeadlineBody<HTTPClientResponse.Body>, path: String, transform: @escaping ([String: Any]) -> (events: [ChatStreamEvent], isLast: Bool)
    ) -> AsyncThrowingStream<ChatStreamEvent, any Error> {
        let client = self.client
        return EventPump(
            NDJSONLines(body).makeAsyncIterator(), mapError: { client.map($0, path: path) },
            endedEarly: { _ in
                OpenAIError(.badGateway, "ollama ended the stream before its final message (\"done\": true)", code: "upstream_invalid")
            }
        ) { line in
            guard let object = try? JSONSerialization.jsonObject(with: line) as? [String: Any] else {
                throw OpenAIError(.badGateway, "ollama sent a stream line that is not JSON", code: "upstream_invalid")
            }
            if let error = Self.errorText(object["error"]) {
                throw OpenAIError(.badGateway, "ollama failed mid-stream: \(error)", code: "upstream_error")
            }
            return transform(object)
        }.stream
    }

    /// Whether a stream line is Ollama's last (`"done": true`).
    static func isDone(_ line: [String: Any]) -> Bool {
        JSONNumbers.bool(line["done"] ?? false) == true
    }

    /// The token counts of a reply, or of a stream's last line (`prompt_eval_count`, `eval_count`).
    static func tokenCounts(_ reply: [String: Any]) -> (prompt: Int, completion: Int) {
        (reply["prompt_eval_count"].flatMap(JSONNumbers.int) ?? 0, reply["eval_count"].flatMap(JSONNumbers.int) ?? 0)
    }

    // MARK: Text completions, on /api/generate

    func textCompletion(_ request: TextCompletionRequest, requestID: String) async throws -> ChatCompletion {
        let reply = try Self.replyObject(
            try await client.call(.POST, "/api/generate", json: Self.generateBody(request, stream: false), requestID: requestID, backend: name),
            masking: client.secrets)
        let (prompt, completion) = Self.tokenCounts(reply)
        let text = (Self.echoedPrompt(request) ?? "") + (reply["response"] as? String ?? "")
        let json = OpenAIShapes.data([
            "id": OpenAIShapes.textCompletionID(), "object": "text_completion", "created": OpenAIShapes.now(),
            "model": reply["model"] as? String ?? request.model,
            "choices": [
                [
                    "index": 0, "text": text, "finish_reason": Self.finishReason(reply, hasToolCalls: false),
                    "logprobs": (Self.textLogprobs(reply["logprobs"], offset: 0)?.logprobs).map { $0 as Any } ?? NSNull(),
                ]
            ],
            "usage": OpenAIShapes.usage(prompt: prompt, completion: completion),
        ])
        return ChatCompletion(json: json, promptTokens: prompt, completionTokens: completion)
    }

    func textCompletionStream(_ request: TextCompletionRequest, requestID: String) async throws -> AsyncThrowingStream<ChatStreamEvent, any Error> {
        let body = try await client.openStream("/api/generate", json: Self.generateBody(request, stream: true), requestID: requestID, backend: name)
        let (id, created, model, includeUsage) = (OpenAIShapes.textCompletionID(), OpenAIShapes.now(), request.model, request.includeUsage)
        func chunk(_ text: String, finishReason: String?, logprobs: Any = NSNull()) -> Data {
            OpenAIShapes.data([
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [["index": 0, "text": text, "logprobs": logprobs, "finish_reason": finishReason.map { $0 as Any } ?? NSNull()]],
            ])
        }
        let textOffset = Mutex(0)  // where the next token starts in the text sent so far
        // `echo`: the prompt goes out first, in the chunk of the first line.
        let echo = Mutex(Self.echoedPrompt(request))
        return events(body, path: "/api/generate") { line in
            var events: [ChatStreamEvent] = []
            if let prompt = echo.withLock({ echo in defer { echo = nil }; return echo }), !prompt.isEmpty {
                events.append(.chunk(chunk(prompt, finishReason: nil)))
            }
            let text = line["response"] as? String ?? ""
            if let (logprobs, end) = Self.textLogprobs(line["logprobs"], offset: textOffset.withLock { $0 }) {
                textOffset.withLock { $0 = end }
                events.append(.chunk(chunk(text, finishReason: nil, logprobs: logprobs)))
            } else if !text.isEmpty {
                events.append(.chunk(chunk(text, finishReason: nil)))
            }
            let done = Self.isDone(line)
            if done {
                events.append(.chunk(chunk("", finishReason: Self.finishReason(line, hasToolCalls: false))))
                let (prompt, completion) = Self.tokenCounts(line)
                events.append(.usage(prompt: prompt, completion: completion))
                if includeUsage {
                    events.append(.chunk(OpenAIShapes.usageChunk(id: id, model: model, created: created, prompt: prompt, completion: completion, object: "text_completion")))
                }
            }
            return (events, done)
        }
    }

    /// The prompt to put before the answer's text when the request asks for `echo` (Ollama has
    /// no echo of its own; the gateway adds it, as OpenAI answers), else nil.
    static func echoedPrompt(_ request: TextCompletionRequest) -> String? {
        guard let echo = request.body["echo"], JSONNumbers.bool(echo) == true else { return nil }
        return request.body["prompt"] as? String
    }

    /// The `/api/generate` body: the prompt (and `suffix`, for fill-in-the-middle) with the
    /// sampling parameters in `options`, as Ollama's own `/v1/completions` sends it.
    /// - Throws: a 400 when `prompt` is not one string (Ollama takes no lists of prompts or
    ///   tokens), when `n` or `best_of` asks for more than one candidate, when `echo` is not a
    ///   boolean, or when `echo` comes with `logprobs` (which would need the prompt's log
    ///   probabilities, which Ollama does not give).
    static func generateBody(_ request: TextCompletionRequest, stream: Bool) throws(OpenAIError) -> Data {
        guard let prompt = request.body["prompt"] as? String else {
            throw RequestFields.invalid("prompt", "must be a string for Ollama (lists of prompts or of tokens are not supported)")
        }
        // Ollama answers an empty prompt by loading the model and generating nothing (`done_reason:
        // "load"`), even with a `suffix`: an empty 200 would read as the model's choice.
        guard !prompt.isEmpty else {
            throw RequestFields.invalid("prompt", "is empty: Ollama only loads the model for an empty prompt and generates nothing")
        }
        if let echo = request.body["echo"], !(echo is NSNull) {
            guard let wanted = JSONNumbers.bool(echo) else { throw RequestFields.invalid("echo", "must be true or false") }
            if wanted, let logprobs = request.body["logprobs"], !(logprobs is NSNull) {
                throw RequestFields.invalid(
                    "echo", "cannot be combined with 'logprobs' for Ollama, which gives no log probabilities for the prompt's tokens")
            }
        }
        if let bestOf = request.body["best_of"], !(bestOf is NSNull), JSONNumbers.int(bestOf) != 1 || JSONNumbers.bool(bestOf) != nil {
            throw RequestFields.invalid("best_of", "must be 1 for Ollama, which generates one candidate per request (got \(OpenAIShapes.describe(bestOf)))")
        }
        var out: [String: Any] = ["model": request.model, "prompt": prompt, "stream": stream]
        if let suffix = request.body["suffix"] as? String { out["suffix"] = suffix }
        // Legacy completions ask with one number: how many alternatives to list per token.
        if let top = try Self.alternativesCount(request.body, "logprobs") {
            out["logprobs"] = true
            out["top_logprobs"] = top
        }
        try checkSingleChoice(request.body)
        let options = try Self.options(request.body, maxTokens: request.body["max_tokens"].flatMap(JSONNumbers.int))
        if !options.isEmpty { out["options"] = options }
        if let keepAlive = request.body["keep_alive"] { out["keep_alive"] = keepAlive }
        return OpenAIShapes.data(out)
    }

    func models(requestID: String) async throws -> Data {
        let body = try await client.call(.GET, "/api/tags", requestID: requestID, backend: name, timeout: min(client.timeout, 30))
        guard let list = try Self.replyObject(body, masking: client.secrets)["models"] as? [[String: Any]] else {
            throw OpenAIError(.badGateway, "ollama sent a /api/tags reply without its 'models' list", code: "upstream_invalid")
        }
        let models = list.map { model -> [String: Any] in
            let id = model["name"] as? String ?? model["model"] as? String ?? "unknown"
            let created = (model["modified_at"] as? String).flatMap { try? Date($0, strategy: .iso8601) }.map { Int($0.timeIntervalSince1970) }
            return ["id": id, "object": "model", "created": created ?? 0, "owned_by": "ollama"]
        }
        return OpenAIShapes.data(["object": "list", "data": models])
    }

    /// `/api/embed`, with `dimensions` (and Ollama's own `truncate`, `keep_alive` and `options`)
    /// passed on and each vector returned as floats or, when
    /// `encoding_format` is `"base64"` (what OpenAI's SDKs ask for by default), as the base64 of
    /// its little-endian float32s.
    func embeddings(_ body: [String: Any], requestID: String) async throws -> Data {
        guard let model = body["model"] as? String, let input = body["input"] else {
            throw OpenAIError(.badRequest, "embeddings need 'model' and 'input'", code: "invalid_request")
        }
        let base64: Bool
        switch body["encoding_format"] {
        case nil, is NSNull, "float" as String: base64 = false
        case "base64" as String: base64 = true
        case let other?:
            throw RequestFields.invalid("encoding_format", "must be \"float\" or \"base64\" (got \(OpenAIShapes.describe(other)))")
        }
        // Ollama embeds text: one string or a list of them (OpenAI's token arrays it cannot take).
        let inputCount: Int
        switch input {
        case let text as String where text.isEmpty:
            // Ollama takes "" for no input at all and answers no vector (OpenAI answers 400).
            throw RequestFields.invalid("input", "must not be an empty string")
        case is String: inputCount = 1
        case let list as [Any] where !list.isEmpty && list.allSatisfy({ $0 is String }): inputCount = list.count
        case let list as [Any] where list.isEmpty:
            throw RequestFields.invalid("input", "must not be an empty list")
        default:
            throw RequestFields.invalid(
                "input", "must be a string or a list of strings for Ollama (token arrays are not supported; got \(Self.describeInput(input)))")
        }
        var request: [String: Any] = ["model": model, "input": input]
        if let dimensions = body["dimensions"], !(dimensions is NSNull) {
            guard let count = JSONNumbers.int(dimensions), count > 0 else {
                throw RequestFields.invalid("dimensions", "must be a positive integer")
            }
            request["dimensions"] = count
        }
        // Ollama's own fields, from a client that speaks them (`options.num_ctx` above all).
        for field in ["truncate", "keep_alive", "options"] {
            if let value = body[field], !(value is NSNull) { request[field] = value }
        }
        let reply = try await client.call(.POST, "/api/embed", json: OpenAIShapes.data(request), requestID: requestID, backend: name)
        let object = try Self.replyObject(reply, masking: client.secrets)
        // One vector of numbers per input, or the answer is not one: never a 200 short of vectors.
        guard let vectors = object["embeddings"] as? [[Any]], vectors.count == inputCount,
            vectors.allSatisfy({ $0.allSatisfy { JSONNumbers.double($0) != nil } })
        else {
            throw OpenAIError(
                .badGateway, "ollama sent an embeddings reply without one vector of numbers for each of the \(inputCount) inputs",
                code: "upstream_invalid")
        }
        let prompt = Self.tokenCounts(object).prompt
        return OpenAIShapes.data([
            "object": "list", "model": model,
            "data": vectors.enumerated().map { index, vector in
                ["object": "embedding", "index": index, "embedding": base64 ? Self.base64Float32(vector) as Any : vector as Any]
            },
            "usage": ["prompt_tokens": prompt, "total_tokens": prompt],
        ])
    }

    /// What an unusable `input` was, briefly (token arrays can be long).
    static func describeInput(_ input: Any) -> String {
        switch input {
        case let list as [Any]:
            switch list.first {
            case is [Any]: "a list of token lists"
            case is NSNumber: "a list of tokens"
            case let first?: "a list holding \(String(OpenAIShapes.describe(first).prefix(60)))"
            case nil: "[]"
            }
        default: String(OpenAIShapes.describe(input).prefix(60))
        }
    }

    /// A vector as OpenAI's base64 encoding: its numbers as little-endian float32s, base64-encoded.
    static func base64Float32(_ vector: Any) -> String {
        var bytes: [UInt8] = []
        for value in vector as? [Any] ?? [] {
            let bits = Float(JSONNumbers.double(value) ?? 0).bitPattern.littleEndian
            withUnsafeBytes(of: bits) { bytes.append(contentsOf: $0) }
        }
        return Data(bytes).base64EncodedString()
    }

    func checkReady(requestID: String) async throws {
        _ = try await client.call(.GET, "/api/version", requestID: requestID, backend: name, timeout: 3)
    }

    // MARK: OpenAI -> Ollama

    /// The `/api/chat` body for an OpenAI request: messages converted, sampling parameters
    /// moved into `options` (`max_tokens` becomes `num_predict`; `temperature: 0` is kept),
    /// `reasoning_effort` (or `reasoning.effort`) into `think`.
    /// - Throws: a 400 when `tool_choice` names a function that is not in `tools`, the
    ///   reasoning effort is not one Ollama knows, `n` asks for more than one choice, or a
    ///   message holds what Ollama cannot take (see `convert`): dropping it would answer a
    ///   different question than the client asked.
    static func translate(_ request: ChatRequest, stream: Bool) throws(OpenAIError) -> Data {
        var out: [String: Any] = ["model": request.model, "stream": stream]
        var toolNames: [String: String] = [:]
        var messages: [[String: Any]] = []
        for (index, message) in request.messages.enumerated() { messages.append(try convert(message, at: index, toolNames: &toolNames)) }
        out["messages"] = messages
        try checkSingleChoice(request.body)
        try checkChatFieldsOllamaCannotHonour(request.body)
        _ = try singleToolCall(request.body)  // checked before the call; applied to the answer
        let options = try Self.options(request.body, maxTokens: request.maxTokens)
        if !options.isEmpty { out["options"] = options }
        if let tools = request.body["tools"] as? [Any], !tools.isEmpty, let offered = try offeredTools(tools, choice: request.body["tool_choice"]) {
            out["tools"] = offered
        }
        if let format = request.body["response_format"] as? [String: Any] {
            switch format["type"] as? String {
            case "json_object": out["format"] = "json"
            case "json_schema": out["format"] = (format["json_schema"] as? [String: Any])?["schema"] ?? "json"
            default: break
            }
        } else if let format = request.body["format"], !(format is NSNull) {
            out["format"] = format  // Ollama's own name, from a client that speaks it
        }
        if let keepAlive = request.body["keep_alive"] { out["keep_alive"] = keepAlive }
        if let think = try think(request.body) { out["think"] = think }
        try chatLogprobsRequest(request.body, into: &out)
        return OpenAIShapes.data(out)
    }

    /// Ollama's `think` for a request: from OpenAI's `reasoning.effort` or `reasoning_effort`
    /// (`"none"` turns thinking off; `"low"`, `"medium"` and `"high"` pass as they are), else
    /// Ollama's own `think` if the client sent it; nil leaves the model's default.
    static func think(_ body: [String: Any]) throws(OpenAIError) -> Any? {
        let nested = (body["reasoning"] as? [String: Any]).flatMap { RequestFields.present($0, "effort") }
        let field = nested != nil ? "reasoning.effort" : "reasoning_effort"
        guard let value = nested ?? RequestFields.present(body, "reasoning_effort") else { return RequestFields.present(body, "think") }
        switch value as? String {
        case "none": return false
        case let effort? where ["low", "medium", "high"].contains(effort): return effort
        default:
            throw OpenAIError(
                .badRequest, "'\(field)' must be one of \"low\", \"medium\", \"high\" or \"none\" for Ollama (got \(OpenAIShapes.describe(value)))",
                code: "invalid_reasoning_effort", param: field)
        }
    }

    /// Ollama's `options` for OpenAI's sampling parameters (`max_tokens` becomes `num_predict`,
    /// a single `stop` string a list; `temperature: 0` is kept), over Ollama's own `options`
    /// when the client sent them too (`num_ctx` above all, which OpenAI's API has no name for:
    /// the `extra_body` of OpenAI's SDKs carries it). The OpenAI name wins where both are given.
    /// - Throws: a 400 for a `stop` that is neither a string nor a list of strings (it would have
    ///   been dropped, and the answer would run past the stop the client asked for), or for
    ///   `options` that are not an object.
    static func options(_ body: [String: Any], maxTokens: Int?) throws(OpenAIError) -> [String: Any] {
        var options: [String: Any]
        switch body["options"] {
        case nil, is NSNull: options = [:]
        case let native as [String: Any]: options = native
        case let other?: throw RequestFields.invalid("options", "must be an object of Ollama's model options, like {\"num_ctx\": 8192} (got \(OpenAIShapes.describe(other)))")
        }
        for key in ["temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty", "min_p", "repeat_penalty"] {
            if let value = body[key], !(value is NSNull) { options[key] = value }
        }
        if let maxTokens { options["num_predict"] = maxTokens }
        switch body["stop"] {
        case nil, is NSNull: break
        case let single as String: options["stop"] = [single]
        case let many as [Any] where many.allSatisfy({ $0 is String }): options["stop"] = many
        case let other?: throw RequestFields.invalid("stop", "must be a string or a list of strings (got \(OpenAIShapes.describe(other)))")
        }
        return options
    }

    /// The tools to offer Ollama, which has no `tool_choice`: none for `"none"`; only the named
    /// one for `{"type":"function","function":{"name":…}}`, and only the listed ones for
    /// `{"type":"allowed_tools","allowed_tools":{"tools":[…]}}` (the model can then call no
    /// other); all of them for `"auto"` and `"required"` (which Ollama cannot enforce).
    /// - Throws: a 400 when a named function is not among the tools (as OpenAI answers), or for
    ///   a `tool_choice` of another shape: offering every tool would let the model call one the
    ///   client ruled out.
    static func offeredTools(_ tools: [Any], choice: Any?) throws(OpenAIError) -> [Any]? {
        func functionName(_ tool: Any) -> String? { ((tool as? [String: Any])?["function"] as? [String: Any])?["name"] as? String }
        func only(_ names: [String]) throws(OpenAIError) -> [Any] {
            let offered = Set(tools.compactMap(functionName))
            if let missing = names.first(where: { !offered.contains($0) }) {
                throw RequestFields.invalid("tool_choice", "names function '\(missing)', which is not in 'tools'")
            }
            return tools.filter { functionName($0).map(names.contains) ?? false }
        }
        switch choice {
        case nil, is NSNull:
            return tools
        case let mode as String:
            switch mode {
            case "none": return nil
            case "auto", "required": return tools
            default: throw RequestFields.invalid("tool_choice", "must be \"none\", \"auto\", \"required\" or an object naming functions (got \(OpenAIShapes.describe(mode)))")
            }
        case let object as [String: Any]:
            switch object["type"] as? String {
            case "function":
                guard let name = functionName(object) else { throw RequestFields.invalid("tool_choice", "must name its function in 'function.name'") }
                return try only([name])
            case "allowed_tools":
                let allowed = object["allowed_tools"] as? [String: Any]
                guard let listed = allowed?["tools"] as? [Any], !listed.isEmpty else {
                    throw RequestFields.invalid("tool_choice", "must list the allowed functions in 'allowed_tools.tools'")
                }
                if let mode = allowed?["mode"], !(mode is NSNull), !["auto", "required"].contains(mode as? String ?? "") {
                    throw RequestFields.invalid("tool_choice", "'allowed_tools.mode' must be \"auto\" or \"required\" (got \(OpenAIShapes.describe(mode)))")
                }
                var names: [String] = []
                for tool in listed {
                    guard let name = functionName(tool) else {
                        throw RequestFields.invalid("tool_choice", "'allowed_tools.tools' may list only functions ({\"type\":\"function\",\"function\":{\"name\":…}}) for Ollama (got \(OpenAIShapes.describe(tool)))")
                    }
                    names.append(name)
                }
                return try only(names)
            case let type:
                throw RequestFields.invalid("tool_choice", "has type \(type.map { "'\($0)'" } ?? "missing"), which Ollama cannot honour (only 'function' and 'allowed_tools')")
            }
        case let other?:
            throw RequestFields.invalid("tool_choice", "must be a string or an object (got \(OpenAIShapes.describe(other)))")
        }
    }

    /// Whether the client asked for at most one tool call per answer (`parallel_tool_calls:
    /// false`). Ollama has no such switch, so the gateway keeps the first call and drops the rest.
    /// - Throws: a 400 when the field is not a boolean.
    static func singleToolCall(_ body: [String: Any]) throws(OpenAIError) -> Bool {
        guard let flag = RequestFields.present(body, "parallel_tool_calls") else { return false }
        guard let parallel = JSONNumbers.bool(flag) else { throw RequestFields.invalid("parallel_tool_calls", "must be true or false") }
        return !parallel
    }

    /// Chat fields that would change the answer, which Ollama has no way to honour (its own
    /// `/v1` drops them silently): refused, so a client does not take an answer to a different
    /// request for the one it asked.
    /// - Throws: a 400 naming the field: the deprecated `functions` and `function_call` (the
    ///   same calls go as `tools` and `tool_choice`), a non-empty `logit_bias`, and an output
    ///   other than text (`modalities`, `audio`).
    static func checkChatFieldsOllamaCannotHonour(_ body: [String: Any]) throws(OpenAIError) {
        func present(_ field: String) -> Any? { RequestFields.present(body, field) }
        for field in ["functions", "function_call"] where present(field) != nil {
            throw RequestFields.invalid(field, "(deprecated function calling) is not supported for Ollama; send the functions as 'tools' (and 'tool_choice')")
        }
        if let bias = present("logit_bias"), !((bias as? [String: Any])?.isEmpty ?? false) {
            throw RequestFields.invalid("logit_bias", "is not supported by Ollama, which cannot bias tokens")
        }
        if let modalities = present("modalities"), !((modalities as? [Any])?.allSatisfy { $0 as? String == "text" } ?? false) {
            throw RequestFields.invalid("modalities", "can only be [\"text\"] for Ollama (got \(OpenAIShapes.describe(modalities)))")
        }
        if present("audio") != nil {
            throw RequestFields.invalid("audio", "is not supported by Ollama, which answers in text only")
        }
    }

    /// Ollama answers one choice per request whatever `n` asks (its own `/v1` ignores `n`), so
    /// more than one is refused rather than silently answered with one.
    static func checkSingleChoice(_ body: [String: Any]) throws(OpenAIError) {
        guard let n = body["n"], !(n is NSNull) else { return }
        guard JSONNumbers.int(n) == 1 else {
            throw RequestFields.invalid("n", "must be 1 for Ollama, which answers one choice per request (got \(OpenAIShapes.describe(n)))")
        }
    }

    /// The image types Ollama's `/v1` takes as data URLs (a bare `data:;base64,` too, as its
    /// `/api/chat` takes unadorned base64).
    static let imageDataURLPrefixes = ["data:;base64,"] + ["jpeg", "jpg", "png", "webp"].map { "data:image/\($0);base64," }

    /// One OpenAI message (item `index` of `messages`) as Ollama expects it: string content,
    /// base64 `images`, tool-call arguments as objects, tool results named, `developer`
    /// instructions as `system` ones.
    /// - Throws: a 400 naming the message and part Ollama cannot take, where Ollama's own `/v1`
    ///   refuses it too: content that is neither a string nor a list of parts, a part that is
    ///   not `text` or `image_url`, an image that is not a base64 data URL of a JPEG, PNG or
    ///   WebP (Ollama fetches no URLs), tool-call arguments that are not a JSON object.
    static func convert(_ message: [String: Any], at index: Int, toolNames: inout [String: String]) throws(OpenAIError) -> [String: Any] {
        func invalid(_ what: String, code: String = "invalid_messages") -> OpenAIError {
            OpenAIError(.badRequest, "'messages' item \(index)\(what)", code: code, param: "messages")
        }
        // OpenAI's newer name for system instructions; Ollama's chat templates know only `system`
        // and would leave a `developer` message out of the prompt.
        // A deprecated `function` result is a tool result to Ollama, named by its `name`.
        let role = message["role"] as? String ?? "user"
        var out: [String: Any] = ["role": role == "developer" ? "system" : role == "function" ? "tool" : role]
        var images: [String] = []
        switch message["content"] {
        case let text as String:
            out["content"] = text
        case let parts as [Any]:
            var texts: [String] = []
            for (partIndex, part) in parts.enumerated() {
                let at = ", content part \(partIndex)"
                guard let part = part as? [String: Any] else { throw invalid("\(at) must be an object") }
                switch part["type"] as? String {
                case "text":
                    guard let text = part["text"] as? String else { throw invalid("\(at): 'text' must be a string") }
                    texts.append(text)
                case "image_url":
                    guard let url = (part["image_url"] as? [String: Any])?["url"] as? String ?? part["image_url"] as? String else {
                        throw invalid("\(at): 'image_url.url' must be a string")
                    }
                    guard let prefix = imageDataURLPrefixes.first(where: { url.hasPrefix($0) }) else {
                        let given = url.hasPrefix("data:") ? String(url.prefix(while: { $0 != "," }).prefix(40)) : "a URL to fetch"
                        throw invalid(
                            "\(at): Ollama takes images only as base64 data URLs of JPEG, PNG or WebP (data:image/png;base64,…), not \(given)",
                            code: "invalid_image")
                    }
                    // Line breaks (base64 wrapped at 76 columns, as MIME tools write it) are no data:
                    // Go's decoder, Ollama's, skips them; Foundation's does not.
                    let payload = String(url.dropFirst(prefix.count).filter { $0 != "\n" && $0 != "\r" && $0 != "\r\n" })
                    guard Data(base64Encoded: payload) != nil else { throw invalid("\(at): the image's data URL is not valid base64", code: "invalid_image") }
                    images.append(payload)
                case let type:
                    throw invalid(
                        "\(at) has type \(type.map { "'\($0)'" } ?? "missing"), which Ollama cannot take (only 'text' and 'image_url')",
                        code: "unsupported_content")
                }
            }
            out["content"] = texts.joined(separator: "\n")
        case nil, is NSNull:
            out["content"] = ""
        case let other?:
            throw invalid(": 'content' must be a string or a list of content parts (got \(OpenAIShapes.describe(other)))")
        }
        if !images.isEmpty { out["images"] = images }
        // An earlier answer's reasoning, sent back (Ollama's `/v1` name; DeepSeek's and vLLM's too).
        if let thinking = message["reasoning"] as? String ?? message["reasoning_content"] as? String, !thinking.isEmpty {
            out["thinking"] = thinking
        }
        if let calls = message["tool_calls"] as? [[String: Any]] {
            var converted: [[String: Any]] = []
            for (callIndex, call) in calls.enumerated() {
                let function = call["function"] as? [String: Any] ?? [:]
                let name = function["name"] as? String ?? ""
                if let id = call["id"] as? String { toolNames[id] = name }
                let arguments: Any
                switch function["arguments"] {
                case let object as [String: Any]:
                    arguments = object
                case let text as String where text.allSatisfy(\.isWhitespace):
                    arguments = [String: Any]()  // no arguments
                case let text as String:
                    guard let object = (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] else {
                        throw invalid(", tool call \(callIndex): 'function.arguments' is not a JSON object", code: "invalid_tool_call_arguments")
                    }
                    arguments = object
                case nil, is NSNull:
                    arguments = [String: Any]()
                case let other?:
                    throw invalid(
                        ", tool call \(callIndex): 'function.arguments' must be a JSON object or its text (got \(OpenAIShapes.describe(other)))",
                        code: "invalid_tool_call_arguments")
                }
                var ollamaCall: [String: Any] = ["function": ["name": name, "arguments": arguments]]
                if let id = call["id"] as? String, !id.isEmpty { ollamaCall["id"] = id }
                converted.append(ollamaCall)
            }
            out["tool_calls"] = converted
        }
        // A tool result names its function: from the call it answers, else its own `name`; and
        // the call by its id (Ollama's `/v1` passes both), so results to two calls of one function
        // cannot be mixed up.
        if out["role"] as? String == "tool", let id = message["tool_call_id"] as? String, !id.isEmpty { out["tool_call_id"] = id }
        if let name = (message["tool_call_id"] as? String).flatMap({ toolNames[$0] }) ?? (out["role"] as? String == "tool" ? message["name"] as? String : nil) {
            out["tool_name"] = name
        }
        return out
    }

    // MARK: Log probabilities (Ollama 0.12.11 and later)

    /// The most alternatives Ollama lists per token.
    static let maxTopLogprobs = 20

    /// OpenAI's chat `logprobs: true` and `top_logprobs` (0 to 20), as Ollama's fields of the same names.
    static func chatLogprobsRequest(_ body: [String: Any], into out: inout [String: Any]) throws(OpenAIError) {
        if let flag = body["logprobs"], !(flag is NSNull) {
            guard let wanted = JSONNumbers.bool(flag) else { throw RequestFields.invalid("logprobs", "must be true or false") }
            if wanted { out["logprobs"] = true }
        }
        if let top = try alternativesCount(body, "top_logprobs") { out["top_logprobs"] = top }
    }

    /// `field`, when present and not null: how many alternatives to list per token, an integer
    /// from 0 to `maxTopLogprobs` (chat's `top_logprobs`, legacy completions' `logprobs`).
    static func alternativesCount(_ body: [String: Any], _ field: String) throws(OpenAIError) -> Int? {
        guard let count = body[field], !(count is NSNull) else { return nil }
        guard let top = JSONNumbers.int(count), (0...maxTopLogprobs).contains(top), JSONNumbers.bool(count) == nil else {
            throw RequestFields.invalid(field, "must be an integer from 0 to \(maxTopLogprobs) (got \(OpenAIShapes.describe(count)))")
        }
        return top
    }

    /// OpenAI's chat entries (`choices[].logprobs.content`) for the `logprobs` of an Ollama
    /// reply or stream line, whose entries have the same fields; nil when there are none.
    static func chatLogprobs(_ value: Any?) -> [[String: Any]]? {
        guard let entries = value as? [[String: Any]], !entries.isEmpty else { return nil }
        func token(_ entry: [String: Any]) -> [String: Any] {
            ["token": entry["token"] as? String ?? "", "logprob": entry["logprob"] ?? 0, "bytes": entry["bytes"] as? [Any] ?? NSNull()]
        }
        return entries.map { entry in
            var out = token(entry)
            out["top_logprobs"] = (entry["top_logprobs"] as? [[String: Any]] ?? []).map(token)
            return out
        }
    }

    /// Legacy completions' `logprobs` for the entries of an Ollama reply or stream line: the
    /// tokens, their logprobs, each position's alternatives (token to logprob) and where each
    /// token starts in the text (from `offset`, the text before them). Nil when there are none.
    /// - Returns: also the offset after these tokens, where a stream's next line starts.
    static func textLogprobs(_ value: Any?, offset: Int) -> (logprobs: [String: Any], end: Int)? {
        guard let entries = value as? [[String: Any]], !entries.isEmpty else { return nil }
        let tokens = entries.map { $0["token"] as? String ?? "" }
        var offsets: [Int] = []
        var position = offset
        for token in tokens {
            offsets.append(position)
            position += token.unicodeScalars.count  // code points, as clients index text (a grapheme may hold several)
        }
        let logprobs: [String: Any] = [
            "tokens": tokens,
            "token_logprobs": entries.map { $0["logprob"] ?? 0 },
            "top_logprobs": entries.map { entry -> [String: Any] in
                var alternatives: [String: Any] = [:]
                for alternative in entry["top_logprobs"] as? [[String: Any]] ?? [] {
                    if let token = alternative["token"] as? String { alternatives[token] = alternative["logprob"] ?? 0 }
                }
                return alternatives
            },
            "text_offset": offsets,
        ]
        return (logprobs, position)
    }

    // MARK: Ollama -> OpenAI

    static func openAIToolCalls(_ value: Any?) -> [[String: Any]] {
        guard let calls = value as? [[String: Any]] else { return [] }
        return calls.enumerated().map { index, call in
            let function = call["function"] as? [String: Any] ?? [:]
            // Ollama gives calls ids since 0.12; earlier ones get one made up.
            let id = (call["id"] as? String).flatMap { $0.isEmpty ? nil : $0 } ?? "call_\(UUID().uuidString.prefix(8).lowercased())_\(index)"
            return [
                "id": id, "type": "function",
                "function": ["name": function["name"] as? String ?? "", "arguments": argumentsText(function["arguments"])],
            ]
        }
    }

    /// A tool call's `arguments` as OpenAI gives them, JSON text: Ollama's object written out
    /// (keys sorted, as Ollama's own `/v1` writes them); text from an upstream that already sends
    /// it passed on; none (absent or null, as Ollama 0.13 writes an empty map) as `{}`.
    static func argumentsText(_ arguments: Any?) -> String {
        switch arguments {
        case nil, is NSNull: return "{}"
        case let text as String: return text
        case let value?:
            // `.fragmentsAllowed`: without it, a value that is not an object or array (a number
            // from a broken upstream) is a fatal error in Foundation, not a thrown one.
            let data = try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys, .fragmentsAllowed])
            return data.map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        }
    }

    static func finishReason(_ reply: [String: Any], hasToolCalls: Bool) -> String {
        if hasToolCalls { return "tool_calls" }
        return (reply["done_reason"] as? String) == "length" ? "length" : "stop"
    }

    /// Turns Ollama stream lines into OpenAI chunks, remembering what was already sent.
    /// Used by one stream's consumer at a time.
    final class StreamTranslator: @unchecked Sendable {
        let id: String
        let created: Int
        let model: String
        /// The client asked for a final usage chunk (`stream_options.include_usage`).
        let includeUsage: Bool
        /// At most this many tool calls are passed on (`parallel_tool_calls: false`: one); nil: all.
        let maxToolCalls: Int?
        var sentRole = false
        var sawToolCalls = false
        var toolIndex = 0

        init(id: String, created: Int, model: String, includeUsage: Bool, maxToolCalls: Int? = nil) {
            self.id = id
            self.created = created
            self.model = model
            self.includeUsage = includeUsage
            self.maxToolCalls = maxToolCalls
        }

        func events(for line: [String: Any]) -> [ChatStreamEvent] {
            var events: [ChatStreamEvent] = []
            let message = line["message"] as? [String: Any] ?? [:]
            var delta: [String: Any] = [:]
            if let content = message["content"] as? String, !content.isEmpty { delta["content"] = content }
            if let thinking = message["thinking"] as? String, !thinking.isEmpty { delta["reasoning"] = thinking }
            var calls = OllamaBackend.openAIToolCalls(message["tool_calls"])
            if let maxToolCalls { calls = Array(calls.prefix(max(0, maxToolCalls - toolIndex))) }
            if !calls.isEmpty {
                sawToolCalls = true
                for index in calls.indices {
                    calls[index]["index"] = toolIndex
                    toolIndex += 1
                }
                delta["tool_calls"] = calls
            }
            let done = OllamaBackend.isDone(line)
            // The first chunk carries the role, as OpenAI's do: even when the first line is the
            // last (an empty answer), or a client rebuilding the message has no role for it.
            if !sentRole {
                delta["role"] = "assistant"
                if delta["content"] == nil && delta["tool_calls"] == nil { delta["content"] = "" }
                sentRole = true
            }
            let logprobs = OllamaBackend.chatLogprobs(line["logprobs"])
            if !delta.isEmpty || logprobs != nil { events.append(.chunk(chunk(delta: delta, finishReason: nil, logprobs: logprobs))) }
            if done {
                events.append(.chunk(chunk(delta: [:], finishReason: OllamaBackend.finishReason(line, hasToolCalls: sawToolCalls))))
                let (prompt, completion) = OllamaBackend.tokenCounts(line)
                events.append(.usage(prompt: prompt, completion: completion))
                if includeUsage {
                    events.append(.chunk(OpenAIShapes.usageChunk(id: id, model: model, created: created, prompt: prompt, completion: completion)))
                }
            }
            return events
        }

        func chunk(delta: [String: Any], finishReason: String?, logprobs: [[String: Any]]? = nil) -> Data {
            var choice: [String: Any] = ["index": 0, "delta": delta, "finish_reason": finishReason.map { $0 as Any } ?? NSNull()]
            if let logprobs { choice["logprobs"] = ["content": logprobs] }
            return OpenAIShapes.data(["id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]])
        }
    }
}

/// Splits a streamed body into lines (NDJSON; SSE's lines too), across chunk boundaries.
///
/// Each byte is searched once, however the lines are split into reads, and a read holding many
/// lines is sliced, not copied once per line. A line is bounded: one longer than
/// `UpstreamClient.maxReplyBytes` ends the stream with a 502 rather than growing without end.
struct NDJSONLines<Base: AsyncSequence & Sendable>: AsyncSequence where Base.Element == ByteBuffer {
    typealias Element = Data
    let base: Base
    let maxLineBytes: Int

    init(_ base: Base, maxLineBytes: Int = UpstreamClient.maxReplyBytes) {
        self.base = base
        self.maxLineBytes = maxLineBytes
    }

    struct AsyncIterator: AsyncIteratorProtocol {
        var upstream: Base.AsyncIterator
        let maxLineBytes: Int
        /// Unread bytes: the current line from the reader index on.
        var pending = ByteBuffer()
        /// How many of `pending`'s bytes are known to hold no newline.
        var searched = 0
        var finished = false

        mutating func next() async throws -> Data? {
            while true {
                if let length = ByteSearch.find(0x0a, in: pending, from: searched) {
                    let line = pending.readSlice(length: length)!
                    pending.moveReaderIndex(forwardBy: 1)
                    searched = 0
                    if Self.isBlank(line) { continue }
                    return Data(line.readableBytesView)
                }
                searched = pending.readableBytes
                guard searched <= maxLineBytes else { throw OpenAIError.upstreamLineTooLong(limit: maxLineBytes) }
                if finished {
                    guard pending.readableBytes > 0 else { return nil }
                    defer { pending = ByteBuffer() }
                    return Self.isBlank(pending) ? nil : Data(pending.readableBytesView)
                }
                if var buffer = try await upstream.next() {
                    if pending.readableBytes == 0 {
                        pending = buffer  // the usual case: the read starts a line, kept as it is
                    } else {
                        pending.discardReadBytes()
                        pending.writeBuffer(&buffer)
                    }
                } else {
                    finished = true
                }
            }
        }

        /// Whether a line holds only spaces and carriage returns (blank lines end SSE events).
        static func isBlank(_ line: ByteBuffer) -> Bool {
            line.readableBytesView.allSatisfy { $0 == 0x20 || $0 == 0x0d }
        }
    }

    func makeAsyncIterator() -> AsyncIterator { AsyncIterator(upstream: base.makeAsyncIterator(), maxLineBytes: maxLineBytes) }
}
