// Unit tests for request validation, the OpenAI <-> Ollama translation and the stream parsers.
import Foundation
import NIOCore
import Testing

@testable import Host

@Suite struct ChatRequestTests {
    func parse(_ json: String) throws -> ChatRequest { try ChatRequest.parse(ByteBuffer(string: json)) }

    @Test func acceptsAMinimalRequestAndReadsStreamFlags() throws {
        let request = try parse(#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#)
        #expect(request.model == "m" && request.stream && request.includeUsage)
    }

    @Test func temperatureZeroIsValidAndOneIsNotABoolean() throws {
        #expect(throws: Never.self) { try parse(#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0}"#) }
        #expect(throws: OpenAIError.self) { try parse(#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":1}"#) }
    }

    @Test func cacheKeyCoversSamplingParametersButNotDelivery() throws {
        let base = try parse(#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0}"#)
        let streamed = try parse(#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0,"stream":true}"#)
        let warmer = try parse(#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0.7}"#)
        #expect(base.cacheKey(backend: "ollama") == streamed.cacheKey(backend: "ollama"))
        #expect(base.cacheKey(backend: "ollama") != warmer.cacheKey(backend: "ollama"))
        #expect(base.cacheKey(backend: "ollama") != base.cacheKey(backend: "openai"))
    }

    @Test func cacheKeySpellsEachNumberOnce() throws {
        func key(_ seed: String) throws -> String {
            try parse(#"{"model":"m","messages":[{"role":"user","content":"x"}],"seed":\#(seed)}"#).cacheKey(backend: "openai")
        }
        #expect(try key("1") == key("1.0"))
        #expect(try key("1") != key("1.5"))
        // Integers Double cannot tell apart (above 2^53) are still different seeds.
        #expect(try key("9007199254740993") != key("9007199254740992"))
        #expect(try key("-9007199254740993") != key("-9007199254740992"))
        // Past Int64 they decode as Doubles: 2^63+1000 and 2^63+1001 shared a key, and the
        // second was answered with the first's seed's answer.
        #expect(try key("9223372036854776808") != key("9223372036854776809"))
        #expect(try key("18446744073709551615") != key("18446744073709551614"))
        #expect(try key("1e300") == key("1e300"))
    }

    @Test func cacheKeyKeepsApartObjectKeysSwiftWouldMerge() throws {
        // "é" composed and decomposed are one dictionary key to Swift (one value kept of two),
        // two to the upstream, which is sent the client's bytes.
        func key(_ format: String) throws -> String {
            try parse(#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":\#(format)}"#).cacheKey(backend: "openai")
        }
        #expect(try key(#"{"café":2,"café":1}"#) != key(#"{"café":3,"café":1}"#))
        #expect(try key(#"{"café":2}"#) == key(#"{"café":2}"#))
        // ASCII keys keep the canonical form: order and spacing still do not matter.
        #expect(try key(#"{"a":1,"b":2}"#) == key(#"{ "b": 2, "a": 1 }"#))
    }
}

@Suite struct OllamaTranslationTests {
    func object(_ data: Data) throws -> [String: Any] { try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any]) }

    @Test func toolChoiceDecidesWhichToolsOllamaIsOffered() throws {
        let tools = #"[{"type":"function","function":{"name":"get_time"}},{"type":"function","function":{"name":"get_weather"}}]"#
        func offered(_ choice: String?) throws -> [String]? {
            let member = choice.map { #","tool_choice":\#($0)"# } ?? ""
            let request = try ChatRequest.parse(ByteBuffer(string: #"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":\#(tools)\#(member)}"#))
            let body = try object(OllamaBackend.translate(request, stream: false))
            return (body["tools"] as? [[String: Any]])?.compactMap { ($0["function"] as? [String: Any])?["name"] as? String }
        }
        #expect(try offered(nil) == ["get_time", "get_weather"])
        #expect(try offered(#""auto""#) == ["get_time", "get_weather"])
        #expect(try offered(#""required""#) == ["get_time", "get_weather"])
        #expect(try offered(#""none""#) == nil)
        #expect(try offered(#"{"type":"function","function":{"name":"get_weather"}}"#) == ["get_weather"])
        #expect(throws: OpenAIError.self) { try offered(#"{"type":"function","function":{"name":"unknown"}}"#) }
    }

    @Test func mapsSamplingParametersIntoOptions() throws {
        let request = try ChatRequest.parse(ByteBuffer(string: """
            {"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0,"max_tokens":12,"stop":"END",
             "top_p":0.5,"seed":3,"response_format":{"type":"json_object"}}
            """))
        let body = try object(OllamaBackend.translate(request, stream: true))
        #expect(body["stream"] as? Bool == true)
        #expect(body["format"] as? String == "json")
        let options = try #require(body["options"] as? [String: Any])
        #expect(options["temperature"] as? Int == 0)
        #expect(options["num_predict"] as? Int == 12)
        #expect(options["stop"] as? [String] == ["END"])
        #expect(options["top_p"] as? Double == 0.5)
        #expect(options["seed"] as? Int == 3)
        // A list of stops passes as it is; a stop Ollama could not take is refused, not dropped.
        #expect(try OllamaBackend.options(["stop": ["a", "b"]], maxTokens: nil)["stop"] as? [String] == ["a", "b"])
        #expect(try OllamaBackend.options(["stop": NSNull()], maxTokens: nil)["stop"] == nil)
        for bad: Any in [5, ["a", 5], ["x": "y"]] {
            #expect(throws: OpenAIError.self) { try OllamaBackend.options(["stop": bad], maxTokens: nil) }
        }
        let refused = #expect(throws: OpenAIError.self) { try OllamaBackend.options(["stop": 5], maxTokens: nil) }
        #expect(refused?.code == "invalid_stop" && refused?.message == "'stop' must be a string or a list of strings (got 5)")
        // Ollama's own options and format (what extra_body carries) reach it; OpenAI's names win.
        let native = try object(OllamaBackend.translate(ChatRequest.parse(ByteBuffer(string: """
            {"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0.2,"options":{"num_ctx":8192,"temperature":0.9},"format":"json"}
            """)), stream: false))
        let nativeOptions = try #require(native["options"] as? [String: Any])
        #expect(nativeOptions["num_ctx"] as? Int == 8192 && nativeOptions["temperature"] as? Double == 0.2)
        #expect(native["format"] as? String == "json")
        #expect(throws: OpenAIError.self) { try OllamaBackend.options(["options": "big"], maxTokens: nil) }
    }

    /// A sampling parameter the client leaves out stays out, so the model's own defaults (its
    /// Modelfile's PARAMETER lines) apply, as LlamaGate leaves them. Ollama's own /v1 would send
    /// OpenAI's temperature and top_p of 1.0 instead; README says why Gatehouse does not.
    @Test func anAbsentSamplingParameterIsLeftToTheModel() throws {
        let request = try ChatRequest.parse(ByteBuffer(string: #"{"model":"m","messages":[{"role":"user","content":"x"}]}"#))
        let body = try object(OllamaBackend.translate(request, stream: false))
        let options = body["options"] as? [String: Any] ?? [:]
        for key in ["temperature", "top_p", "top_k", "seed", "num_predict"] {
            #expect(options[key] == nil, "\(key) was sent though the client left it out")
        }
    }

    @Test func aNullParameterIsNoParameter() throws {
        // The SDK sends `max_completion_tokens: null` for a None beside the `max_tokens` meant.
        let limited = try ChatRequest.parse(ByteBuffer(string: """
            {"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":64,"max_completion_tokens":null}
            """))
        #expect(limited.maxTokens == 64)
        let options = try #require(try object(OllamaBackend.translate(limited, stream: false))["options"] as? [String: Any])
        #expect(options["num_predict"] as? Int == 64)
        #expect(try OllamaBackend.think(["reasoning": ["effort": NSNull()], "reasoning_effort": "low"]) as? String == "low")
        #expect(try OllamaBackend.think(["reasoning_effort": NSNull(), "think": NSNull()]) == nil)
    }

    @Test func toolCallArgumentsOfAnyShapeBecomeJSONText() {
        // A null or a number went to Foundation's writer, whose top-level check is fatal.
        func arguments(_ value: Any?) -> String? {
            let call: [String: Any] = ["function": value.map { ["name": "f", "arguments": $0] } ?? ["name": "f"]]
            return (OllamaBackend.openAIToolCalls([call]).first?["function"] as? [String: Any])?["arguments"] as? String
        }
        #expect(arguments(["b": 1, "a": ["x"]] as [String: Any]) == #"{"a":["x"],"b":1}"#)
        #expect(arguments(nil) == "{}")
        #expect(arguments(NSNull()) == "{}")
        #expect(arguments(#"{"tz":"UTC"}"#) == #"{"tz":"UTC"}"#)
        #expect(arguments(NSNumber(value: 5)) == "5")
        #expect(arguments([1, 2]) == "[1,2]")
    }

    @Test func convertsContentPartsImagesAndToolCalls() throws {
        var names: [String: String] = [:]
        let parts = try OllamaBackend.convert(
            ["role": "user", "content": [["type": "text", "text": "look"], ["type": "image_url", "image_url": ["url": "data:image/png;base64,AAAA"]]]],
            at: 0, toolNames: &names)
        #expect(parts["content"] as? String == "look")
        #expect(parts["images"] as? [String] == ["AAAA"])
        let call = try OllamaBackend.convert(
            ["role": "assistant", "content": NSNull(), "tool_calls": [["id": "c1", "type": "function", "function": ["name": "f", "arguments": #"{"a":1}"#]]]],
            at: 1, toolNames: &names)
        #expect(call["content"] as? String == "")
        let function = try #require((call["tool_calls"] as? [[String: Any]])?.first?["function"] as? [String: Any])
        #expect((function["arguments"] as? [String: Any])?["a"] as? Int == 1)
        let instructions = try OllamaBackend.convert(["role": "developer", "content": "Answer in French."], at: 0, toolNames: &names)
        #expect(instructions["role"] as? String == "system" && instructions["content"] as? String == "Answer in French.")
        let result = try OllamaBackend.convert(["role": "tool", "tool_call_id": "c1", "content": "42"], at: 2, toolNames: &names)
        #expect(result["tool_name"] as? String == "f")
        let noArguments = try OllamaBackend.convert(
            ["role": "assistant", "tool_calls": [["id": "c2", "type": "function", "function": ["name": "g", "arguments": ""]]]], at: 3, toolNames: &names)
        let empty = try #require((noArguments["tool_calls"] as? [[String: Any]])?.first?["function"] as? [String: Any])
        #expect((empty["arguments"] as? [String: Any])?.isEmpty == true)
    }

    @Test func refusesWhatOllamaCannotTakeNamingTheMessageAndPart() throws {
        func refusal(_ message: [String: Any]) -> OpenAIError? {
            var names: [String: String] = [:]
            do {
                _ = try OllamaBackend.convert(message, at: 4, toolNames: &names)
                return nil
            } catch { return error }
        }
        func image(_ url: String) -> [String: Any] {
            ["role": "user", "content": [["type": "text", "text": "look"], ["type": "image_url", "image_url": ["url": url]]]]
        }
        let fetched = try #require(refusal(image("https://example.com/cat.png")))
        #expect(fetched.code == "invalid_image" && fetched.status == .badRequest)
        #expect(fetched.message.hasPrefix("'messages' item 4, content part 1: Ollama takes images only as base64 data URLs"))
        #expect(fetched.message.hasSuffix("not a URL to fetch"))
        #expect(try #require(refusal(image("data:image/gif;base64,R0lGOD"))).message.hasSuffix("not data:image/gif;base64"))
        #expect(refusal(image("data:image/png;base64,not*base64"))?.code == "invalid_image")
        #expect(refusal(image("data:image/webp;base64,AAAA")) == nil && refusal(image("data:;base64,AAAA")) == nil)
        let audio = try #require(refusal(["role": "user", "content": [["type": "input_audio", "input_audio": ["data": "AAAA", "format": "wav"]]]]))
        #expect(audio.code == "unsupported_content")
        #expect(audio.message == "'messages' item 4, content part 0 has type 'input_audio', which Ollama cannot take (only 'text' and 'image_url')")
        #expect(refusal(["role": "user", "content": 42])?.message == "'messages' item 4: 'content' must be a string or a list of content parts (got 42)")
        let arguments = try #require(refusal(
            ["role": "assistant", "content": "", "tool_calls": [["id": "c", "type": "function", "function": ["name": "f", "arguments": "{\"a\":"]]]]))
        #expect(arguments.code == "invalid_tool_call_arguments")
        #expect(arguments.message == "'messages' item 4, tool call 0: 'function.arguments' is not a JSON object")
    }

    @Test func refusesChatFieldsOllamaCannotHonourAndTakesEmptyOnes() throws {
        func refusal(_ fields: String) -> OpenAIError? {
            do {
                _ = try OllamaBackend.translate(
                    ChatRequest.parse(ByteBuffer(string: #"{"model":"m","messages":[{"role":"user","content":"x"}],\#(fields)}"#)), stream: false)
                return nil
            } catch { return error as? OpenAIError }
        }
        #expect(refusal(#""functions":[{"name":"f","parameters":{}}]"#)?.code == "invalid_functions")
        #expect(refusal(#""function_call":"auto""#)?.message
            == "'function_call' (deprecated function calling) is not supported for Ollama; send the functions as 'tools' (and 'tool_choice')")
        #expect(refusal(#""logit_bias":{"50256":-100}"#)?.message == "'logit_bias' is not supported by Ollama, which cannot bias tokens")
        #expect(refusal(#""modalities":["text","audio"]"#)?.code == "invalid_modalities")
        #expect(refusal(#""audio":{"voice":"alloy","format":"wav"}"#)?.code == "invalid_audio")
        // What asks for nothing Ollama lacks passes: an empty bias, text only, nulls.
        #expect(refusal(#""logit_bias":{},"modalities":["text"],"audio":null,"functions":null"#) == nil)
        // An old function result is a tool result, named.
        var names: [String: String] = [:]
        let result = try OllamaBackend.convert(["role": "function", "name": "get_time", "content": "12:00"], at: 1, toolNames: &names)
        #expect(result["role"] as? String == "tool" && result["tool_name"] as? String == "get_time")
    }

    @Test func refusesMoreThanOneChoice() throws {
        func translate(_ n: String) throws -> Data {
            try OllamaBackend.translate(ChatRequest.parse(ByteBuffer(string: #"{"model":"m","messages":[{"role":"user","content":"x"}],"n":\#(n)}"#)), stream: false)
        }
        #expect(throws: Never.self) { try translate("1") }
        #expect(throws: Never.self) { try translate("null") }
        do {
            _ = try translate("3")
            Issue.record("n=3 was accepted")
        } catch let error as OpenAIError {
            #expect(error.code == "invalid_n" && error.message == "'n' must be 1 for Ollama, which answers one choice per request (got 3)")
        }
    }

    @Test func allowedToolsNarrowTheToolsAndUnknownChoicesAreRefused() throws {
        let tools = #"[{"type":"function","function":{"name":"a"}},{"type":"function","function":{"name":"delete_everything"}}]"#
        func offered(_ choice: String) throws -> [String]? {
            let request = try ChatRequest.parse(ByteBuffer(string: #"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":\#(tools),"tool_choice":\#(choice)}"#))
            let body = try object(OllamaBackend.translate(request, stream: false))
            return (body["tools"] as? [[String: Any]])?.compactMap { ($0["function"] as? [String: Any])?["name"] as? String }
        }
        // OpenAI's newer way to rule tools out: the others were offered, and could be called.
        #expect(try offered(#"{"type":"allowed_tools","allowed_tools":{"mode":"auto","tools":[{"type":"function","function":{"name":"a"}}]}}"#) == ["a"])
        #expect(try offered(#"{"type":"allowed_tools","allowed_tools":{"mode":"required","tools":[{"type":"function","function":{"name":"a"}}]}}"#) == ["a"])
        for refused in [
            #"{"type":"allowed_tools","allowed_tools":{"tools":[{"type":"function","function":{"name":"b"}}]}}"#,
            #"{"type":"allowed_tools","allowed_tools":{"mode":"sometimes","tools":[{"type":"function","function":{"name":"a"}}]}}"#,
            #"{"type":"allowed_tools","allowed_tools":{"tools":[{"type":"custom","custom":{"name":"a"}}]}}"#,
            #"{"type":"allowed_tools","allowed_tools":{"tools":[]}}"#,
            #"{"type":"custom","custom":{"name":"a"}}"#, #"{"function":{"name":"a"}}"#, #""any""#, "5",
        ] {
            let error = #expect(throws: OpenAIError.self, "\(refused)") { try offered(refused) }
            #expect(error?.code == "invalid_tool_choice" && error?.param == "tool_choice", "\(refused)")
        }
    }

    @Test func parallelToolCallsFalseKeepsTheFirstCall() throws {
        #expect(try OllamaBackend.singleToolCall(["parallel_tool_calls": false]))
        #expect(try !OllamaBackend.singleToolCall(["parallel_tool_calls": true]))
        #expect(try !OllamaBackend.singleToolCall([:]))
        #expect(throws: OpenAIError.self) { try OllamaBackend.singleToolCall(["parallel_tool_calls": "no"]) }
        let request = try ChatRequest.parse(ByteBuffer(string: #"{"model":"m","messages":[{"role":"user","content":"x"}],"parallel_tool_calls":"no"}"#))
        #expect(throws: OpenAIError.self) { try OllamaBackend.translate(request, stream: true) }
        // Streamed: Ollama sends its calls in one line (or several); only the first goes on.
        let translator = OllamaBackend.StreamTranslator(id: "chatcmpl-1", created: 1, model: "m", includeUsage: false, maxToolCalls: 1)
        let call = { (city: String) -> [String: Any] in ["function": ["name": "get_weather", "arguments": ["city": city]]] }
        let first = translator.events(for: ["message": ["role": "assistant", "content": "", "tool_calls": [call("Paris"), call("Rome")]], "done": false])
        let second = translator.events(for: ["message": ["role": "assistant", "content": "", "tool_calls": [call("Oslo")]], "done": false])
        let last = translator.events(for: ["message": ["role": "assistant", "content": ""], "done": true, "done_reason": "stop"])
        func choice(_ event: ChatStreamEvent) throws -> [String: Any] {
            guard case .chunk(let data) = event else { throw CancellationError() }
            return try #require((try object(data)["choices"] as? [[String: Any]])?.first)
        }
        let calls = try #require((try choice(first[0])["delta"] as? [String: Any])?["tool_calls"] as? [[String: Any]])
        #expect(calls.count == 1 && calls[0]["index"] as? Int == 0)
        #expect(((calls[0]["function"] as? [String: Any])?["arguments"] as? String) == #"{"city":"Paris"}"#)
        #expect(second.isEmpty)
        #expect(try choice(last[0])["finish_reason"] as? String == "tool_calls")
    }

    @Test func toolCallIdsGoBackToOllama() throws {
        // Two calls of one function answered out of order: only the ids tell the results apart.
        let request = try ChatRequest.parse(ByteBuffer(string: """
            {"model":"m","messages":[{"role":"user","content":"weather?"},
             {"role":"assistant","content":null,"tool_calls":[
               {"id":"call_abc","type":"function","function":{"name":"get_weather","arguments":"{\\"city\\":\\"Paris\\"}"}},
               {"id":"call_def","type":"function","function":{"name":"get_weather","arguments":"{\\"city\\":\\"Rome\\"}"}}]},
             {"role":"tool","tool_call_id":"call_def","content":"12C"},
             {"role":"tool","tool_call_id":"call_abc","content":"31C"}]}
            """))
        let messages = try #require(try object(OllamaBackend.translate(request, stream: false))["messages"] as? [[String: Any]])
        let calls = try #require(messages[1]["tool_calls"] as? [[String: Any]])
        #expect(calls.map { $0["id"] as? String } == ["call_abc", "call_def"])
        #expect(messages[2]["tool_call_id"] as? String == "call_def" && messages[2]["tool_name"] as? String == "get_weather")
        #expect(messages[3]["tool_call_id"] as? String == "call_abc")
        #expect(messages[0]["tool_call_id"] == nil)
    }

    @Test func wrappedBase64ImagesAreAcceptedWithoutTheirLineBreaks() throws {
        let wrapped = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk\\r\\n+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==\\n"
        let request = try ChatRequest.parse(ByteBuffer(string: """
            {"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,\(wrapped)"}}]}]}
            """))
        let messages = try #require(try object(OllamaBackend.translate(request, stream: false))["messages"] as? [[String: Any]])
        #expect(messages[0]["images"] as? [String] == ["iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="])
        let broken = try ChatRequest.parse(ByteBuffer(string: """
            {"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBO*w0K"}}]}]}
            """))
        #expect(throws: OpenAIError.self) { try OllamaBackend.translate(broken, stream: false) }
    }

    @Test func textOffsetsCountCodePoints() throws {
        // Python, the SDK's language, indexes text by code point: "é\r\nok".index("ok") == 3.
        let entries: [[String: Any]] = [["token": "é", "logprob": -0.1], ["token": "\r\n", "logprob": -0.2], ["token": "ok", "logprob": -0.3]]
        let result = try #require(OllamaBackend.textLogprobs(entries, offset: 0))
        #expect(result.logprobs["text_offset"] as? [Int] == [0, 1, 3])
        #expect(result.end == 5)
    }

    @Test func anEmptyPromptIsRefusedForOllama() throws {
        let empty = try TextCompletionRequest.parse(ByteBuffer(string: #"{"model":"m","prompt":"","suffix":"\ndef main():"}"#))
        let error = #expect(throws: OpenAIError.self) { try OllamaBackend.generateBody(empty, stream: false) }
        #expect(error?.code == "invalid_prompt" && error?.message == "'prompt' is empty: Ollama only loads the model for an empty prompt and generates nothing")
    }

    @Test func streamTranslatorSendsRoleFirstThenContentThenFinishAndUsage() throws {
        let translator = OllamaBackend.StreamTranslator(id: "chatcmpl-1", created: 1, model: "m", includeUsage: true)
        let first = translator.events(for: ["message": ["role": "assistant", "content": "Hel"], "done": false])
        let second = translator.events(for: ["message": ["role": "assistant", "content": "lo"], "done": false])
        let last = translator.events(for: ["message": ["role": "assistant", "content": ""], "done": true, "done_reason": "length",
                                           "prompt_eval_count": 7, "eval_count": 2])
        func delta(_ event: ChatStreamEvent) throws -> [String: Any] {
            guard case .chunk(let data) = event else { throw CancellationError() }
            let chunk = try object(data)
            return try #require(((chunk["choices"] as? [[String: Any]])?.first?["delta"]) as? [String: Any])
        }
        #expect(try delta(first[0])["role"] as? String == "assistant")
        #expect(try delta(first[0])["content"] as? String == "Hel")
        #expect(try delta(second[0])["role"] == nil)
        #expect(last.count == 3)  // finish chunk, usage event, usage chunk
        guard case .chunk(let finish) = last[0], case .usage(let prompt, let completion) = last[1] else {
            Issue.record("unexpected events \(last)")
            return
        }
        #expect(((try object(finish)["choices"] as? [[String: Any]])?.first?["finish_reason"]) as? String == "length")
        #expect(prompt == 7 && completion == 2)
    }

    @Test func anEmptyStreamedAnswerStillCarriesTheRole() throws {
        // A model that stops at once: Ollama's first line is already its last.
        let translator = OllamaBackend.StreamTranslator(id: "chatcmpl-1", created: 1, model: "m", includeUsage: false)
        let events = translator.events(for: ["message": ["role": "assistant", "content": ""], "done": true, "done_reason": "stop"])
        guard events.count == 3, case .chunk(let first) = events[0], case .chunk(let finish) = events[1] else {
            Issue.record("unexpected events \(events)")
            return
        }
        let choice = try #require((try object(first)["choices"] as? [[String: Any]])?.first)
        #expect(choice["delta"] as? [String: String] == ["role": "assistant", "content": ""])
        #expect(((try object(finish)["choices"] as? [[String: Any]])?.first?["finish_reason"]) as? String == "stop")
    }
}

@Suite struct StreamParsingTests {
    struct Chunks: AsyncSequence, Sendable {
        typealias Element = ByteBuffer
        let parts: [String]
        struct AsyncIterator: AsyncIteratorProtocol {
            var remaining: [String]
            mutating func next() async -> ByteBuffer? { remaining.isEmpty ? nil : ByteBuffer(string: remaining.removeFirst()) }
        }
        func makeAsyncIterator() -> AsyncIterator { AsyncIterator(remaining: parts) }
    }

    @Test func ndjsonLinesSurviveArbitraryChunkBoundaries() async throws {
        var lines: [String] = []
        for try await line in NDJSONLines(Chunks(parts: ["{\"a\":", "1}\n{\"b\"", ":2}\r\n\n", "{\"c\":3}"])) {
            lines.append(String(decoding: line, as: UTF8.self))
        }
        #expect(lines == [#"{"a":1}"#, "{\"b\":2}\r", #"{"c":3}"#])
    }

    @Test func ndjsonLinesSplitOneReadOfManyLinesAndOneLineOfManyReads() async throws {
        // Many lines in one read, then one line trickled a byte per read, then a last line without its newline.
        let many = (0..<500).map { "{\"i\":\($0)}\n" }.joined()
        let trickled = "{\"long\":\"" + String(repeating: "y", count: 300) + "\"}\n"
        var lines: [String] = []
        for try await line in NDJSONLines(Chunks(parts: [many] + trickled.map { String($0) } + ["{\"end\":1}"])) {
            lines.append(String(decoding: line, as: UTF8.self))
        }
        #expect(lines.count == 502)
        #expect(lines.first == #"{"i":0}"#)
        #expect(lines[499] == #"{"i":499}"#)
        #expect(lines[500] == String(trickled.dropLast()))
        #expect(lines.last == #"{"end":1}"#)
    }

    @Test func ndjsonLinesRefuseALineThatOutgrowsTheLimit() async throws {
        var lines: [String] = []
        let error = await #expect(throws: OpenAIError.self) {
            for try await line in NDJSONLines(Chunks(parts: ["{\"ok\":1}\n{\"never", String(repeating: "z", count: 40), "ending"]), maxLineBytes: 32) {
                lines.append(String(decoding: line, as: UTF8.self))
            }
        }
        #expect(lines == [#"{"ok":1}"#])
        #expect(error?.status == .badGateway)
        #expect(error?.code == "upstream_too_large")
    }

    @Test func sseDataEventsSkipCommentsAndEventLines() async throws {
        let raw = ": keep-alive\n\nevent: message\ndata: {\"x\":1}\n\ndata:{\"y\":2}\r\n\ndata: [DONE]\n\n"
        var payloads: [String] = []
        for try await payload in SSEDataEvents(NDJSONLines(Chunks(parts: [raw]))) {
            payloads.append(String(decoding: payload, as: UTF8.self))
        }
        #expect(payloads == [#"{"x":1}"#, #"{"y":2}"#, "[DONE]"])
    }

    @Test func openAIUsageOnlyChunksAreSwallowedUnlessAsked() throws {
        let usageOnly = Data(#"{"id":"x","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":5}}"#.utf8)
        let swallowed = try OpenAIBackend.events(for: usageOnly, forwardUsage: false)
        #expect(swallowed.count == 1)
        if case .usage(let prompt, let completion) = swallowed[0] { #expect(prompt == 4 && completion == 5) } else { Issue.record("no usage") }
        #expect(try OpenAIBackend.events(for: usageOnly, forwardUsage: true).count == 2)
        #expect(throws: OpenAIError.self) { try OpenAIBackend.events(for: Data(#"{"error":{"message":"boom"}}"#.utf8), forwardUsage: false) }
        // A chunk saying "error": null has none: relayed (it ended the stream as "unknown error").
        let fine = Data(#"{"choices":[{"index":0,"delta":{"content":"a"}}],"error":null}"#.utf8)
        #expect(try OpenAIBackend.events(for: fine, forwardUsage: false).count == 1)
    }

    @Test func onlyUsageAndErrorPayloadsAreParsed() {
        func parsed(_ text: String) -> Bool { Data(text.utf8).withUnsafeBytes(OpenAIBackend.needsParsing) }
        #expect(parsed(#"{"choices":[],"usage":{"prompt_tokens":1}}"#))
        #expect(parsed(#"{"choices": [], "usage": {"prompt_tokens": 1}}"#))
        #expect(parsed(#"{"usage" :  {"prompt_tokens": 1}}"#))
        #expect(parsed(#"{"error":"boom"}"#))
        #expect(!parsed(#"{"choices":[{"delta":{"content":"usage"}}],"usage":null}"#))
        #expect(!parsed(#"{"choices":[{"delta":{"content":"no error here"}}]}"#))
        #expect(!parsed(#"{"usage"#))
        #expect(!parsed(""))
    }
}

@Suite struct ByteSearchTests {
    @Test func findsNeedlesAtEveryPosition() {
        let data = Data("abcabd\"usage\":{\"prompt_tokens\": 12}".utf8)
        #expect(ByteSearch.find(Array("abd".utf8), in: data) == 3)
        #expect(ByteSearch.find(Array("a".utf8), in: data) == 0)
        #expect(ByteSearch.find(Array("12}".utf8), in: data) == data.count - 3)
        #expect(ByteSearch.find(Array("abe".utf8), in: data) == nil)
        #expect(ByteSearch.find(Array("x".utf8), in: Data()) == nil)
        #expect(JSONScan.integer(after: "prompt_tokens", in: data) == 12)
        #expect(JSONScan.integer(after: "completion_tokens", in: data) == nil)
        #expect(ByteSearch.contains(Array("key".utf8), in: "x-api-key"))
    }
}

@Suite struct UpstreamStatusErrorTests {
    @Test func passesOnTheUpstreamsRetryAfterForBusyAnswersOnly() {
        let body = ByteBuffer(string: #"{"error":{"message":"slow down"}}"#)
        func retryAfter(_ status: Int, _ value: String?) -> String? {
            UpstreamClient.upstreamStatusError(status: status, body: body, backend: "openai", retryAfter: value, masking: SecretMask()).headers[.retryAfter]
        }
        #expect(retryAfter(429, "7") == "7")
        #expect(retryAfter(503, " 30 ") == "30")
        #expect(retryAfter(503, "Wed, 21 Oct 2026 07:28:00 GMT") == "Wed, 21 Oct 2026 07:28:00 GMT")
        #expect(retryAfter(500, "7") == nil)
        #expect(retryAfter(429, "soon") == nil)
        #expect(retryAfter(429, "7\r\nX-Injected: 1") == nil)
        #expect(retryAfter(429, nil) == nil)
        let unavailable = UpstreamClient.upstreamStatusError(status: 503, body: body, backend: "openai", masking: SecretMask())
        #expect(unavailable.status == .serviceUnavailable && unavailable.code == "upstream_unavailable")
        #expect(unavailable.message == "openai is unavailable: slow down")
    }

    @Test func theUpstreamKeyQuotedInItsMessageIsMasked() {
        let body = ByteBuffer(string: #"{"error":{"message":"Invalid key abcd-1234-long (prefix abcd-1234); use ab","param":"abcd-1234"}}"#)
        let error = UpstreamClient.upstreamStatusError(status: 401, body: body, backend: "openai", masking: SecretMask(["abcd-1234", "abcd-1234-long", "ab", nil]))
        // Longest first (no half-masked key); a value too short to be a key is left alone.
        #expect(error.message == "openai refused the gateway's credentials: Invalid key [REDACTED] (prefix [REDACTED]); use ab")
        #expect(SecretMask().mask("abcd-1234") == "abcd-1234")
    }

    @Test func aNotFoundNamesTheModelOrTheRoute() {
        func error(_ body: String) -> OpenAIError {
            UpstreamClient.upstreamStatusError(status: 404, body: ByteBuffer(string: body), backend: "ollama", masking: SecretMask())
        }
        // Ollama's, vLLM's and OpenAI's answers for an unknown model: the client's to fix.
        let ollama = error(#"{"error":"model \"x\" not found, try pulling it first"}"#)
        #expect(ollama.status == .notFound && ollama.code == "model_not_found")
        let vllm = error(#"{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","code":404}"#)
        #expect(vllm.status == .notFound && vllm.code == "model_not_found")
        let coded = error(#"{"error":{"message":"No such thing","code":"model_not_found"}}"#)
        #expect(coded.status == .notFound && coded.code == "model_not_found")
        // A route the upstream does not serve (a wrong base URL): the gateway's to fix.
        let route = error("404 page not found")
        #expect(route.status == .badGateway && route.code == "upstream_not_found")
        #expect(route.message == "ollama has no such route (HTTP 404: 404 page not found); check the upstream URL")
        #expect(error(#"{"detail":"Not Found"}"#).code == "upstream_not_found")
    }

    @Test func aStreamPastItsDeadlineEndsWithItsError() async throws {
        let (parts, continuation) = AsyncStream<ByteBuffer>.makeStream()
        for text in ["a", "b"] { continuation.yield(ByteBuffer(string: text)) }
        continuation.finish()
        let error = OpenAIError(.gatewayTimeout, "too long", code: "upstream_timeout")
        var open = DeadlineBody(base: parts, deadline: .now + .seconds(60), error: error).makeAsyncIterator()
        #expect(try await open.next() == ByteBuffer(string: "a"))
        let (more, moreContinuation) = AsyncStream<ByteBuffer>.makeStream()
        moreContinuation.yield(ByteBuffer(string: "late"))
        var past = DeadlineBody(base: more, deadline: .now - .seconds(1), error: error).makeAsyncIterator()
        await #expect(throws: OpenAIError.self) { try await past.next() }
    }

    @Test func aWholeCallIsCutOffAtItsTimeout() async throws {
        let error = OpenAIError(.gatewayTimeout, "too long", code: "upstream_timeout")
        #expect(try await UpstreamClient.within(seconds: 5, orElse: error) { 7 } == 7)
        let started = ContinuousClock.now
        await #expect(throws: OpenAIError.self) {
            try await UpstreamClient.within(seconds: 0.1, orElse: error) { try await Task.sleep(for: .seconds(30)); return 7 }
        }
        #expect(ContinuousClock.now - started < .seconds(5))  // the work was cancelled, not waited for
    }

    @Test func anAnswerPastTheReadLimitIsNamedWithTheLimit() {
        let error = UpstreamFailure(NIOTooManyBytesError(maxBytes: UpstreamClient.maxReplyBytes)).error(target: "http://u/api/embed", timeout: 30)
        #expect(error.status == .badGateway && error.code == "upstream_too_large")
        #expect(error.message == "upstream reply is larger than 64 MiB, the most the gateway reads for one answer (http://u/api/embed)")
        #expect(!UpstreamFailure.tooLarge(1).isConnectionLoss)  // not retried on a fresh connection
    }
}

@Suite struct WholeAnswerTests {
    private func counts(_ text: String) throws -> (prompt: Int, completion: Int) {
        let bytes = Array(text.utf8)
        return try bytes.withUnsafeBytes { try OpenAIBackend.tokenCounts(inReply: $0, masking: SecretMask(["sk-secret-key"])) }
    }

    private func refusal(_ text: String) -> OpenAIError? {
        do {
            _ = try counts(text)
            return nil
        } catch {
            return error as? OpenAIError
        }
    }

    @Test func aWholeAnswerPassesWithItsUsage() throws {
        let answer = #"{"id":"c","choices":[{"index":0,"message":{"role":"assistant","content":"h\u00e9 ✓"}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#
        #expect(try counts(answer) == (5, 2))
        // JSON the strict scan leaves to the decoder (an escaped key, a long number) still passes.
        #expect(try counts(#"{"choices":[],"x\u0041":1,"n":1.00000000000000000000000000000000001}"#) == (0, 0))
    }

    @Test func aReplyThatIsNotAWholeAnswerIsA502() {
        let answer = #"{"id":"c","choices":[{"index":0,"message":{"role":"assistant","content":"hello"}}]}"#
        // Cut short where the connection closed, at any point.
        for end in [20, 40, answer.utf8.count - 1] {
            let cut = refusal(String(answer.utf8.prefix(end))!)
            #expect(cut?.status == .badGateway && cut?.code == "upstream_invalid", "cut at \(end)")
        }
        let error = refusal(#"{"error":{"message":"overloaded; key sk-secret-key","type":"server_error"}}"#)
        #expect(error?.status == .badGateway && error?.code == "upstream_error")
        #expect(error?.message == "openai failed (an error sent with HTTP 200): overloaded; key [REDACTED]")
        #expect(refusal(#"{"object":"list"}"#)?.message == "openai upstream sent a reply without 'choices'")
        #expect(refusal("[1]")?.code == "upstream_invalid")
        #expect(refusal(#"{"choices":[]} trailing"#)?.code == "upstream_invalid")
    }
    @Test func aWholeAnswerNoStrictParserTakesStillPasses() throws {
        // Python's json (the SDK's) reads a lone surrogate escape, -Infinity and 1e4000; refused
        // as "not valid JSON", they became 502s the SDK retried, each a new upstream call.
        for odd in [#""\ud83d""#, #""\ude00 x""#, "-Infinity", "NaN", "1e4000"] {
            let answer = #"{"choices":[{"index":0,"message":{"role":"assistant","content":"# + odd + "}}]}"
            #expect(try counts(answer) == (0, 0), "\(odd)")
            // Cut short, the same answer is still a 502.
            #expect(refusal(String(answer.dropLast(3)))?.code == "upstream_invalid", "\(odd)")
        }
    }

    @Test func aWholeContainerIsToldFromOneCutShort() {
        func whole(_ text: String) -> Bool { Array(text.utf8).withUnsafeBytes(JSONStructure.isWhole) }
        #expect(whole(#" {"a":["}",{"b":"\"]"}]} "#))
        #expect(whole("[1, NaN]"))
        #expect(!whole(#"{"a":"x"#) && !whole(#"{"a":1"#) && !whole(#"{"a":"\"}"#))
        #expect(!whole("{} {}") && !whole("1") && !whole("x{}") && !whole("}{") && !whole(""))
    }
}
