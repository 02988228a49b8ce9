// The pass-through's request scan must agree with the decoding path wherever it answers.
import Foundation
import NIOCore
import Testing

@testable import Host

@Suite struct ChatRequestScanTests {
    func scan(_ text: String) -> ChatRequestScan? {
        Data(text.utf8).withUnsafeBytes(ChatRequestScan.scan)
    }

    /// The body the decoding path would send upstream, for comparison.
    func decodedUpstreamBody(_ text: String) throws -> String {
        let request = try ChatRequest.parse(ByteBuffer(string: text))
        return String(decoding: OpenAIBackend.upstreamBody(request, stream: request.stream), as: UTF8.self)
    }

    func scannedUpstreamBody(_ text: String, _ result: ChatRequestScan) -> String {
        guard let prefix = result.upstreamPrefix, let brace = text.firstIndex(of: "{") else { return text }
        return String(text[...brace]) + prefix + String(text[text.index(after: brace)...])
    }

    @Test func acceptsForwardableRequestsAndAgreesWithTheDecoder() throws {
        let accepted = [
            #"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            #" { "model" : "m" , "messages" : [ { "role" : "user" , "content" : "hi" } ] , "stream" : false } "#,
            #"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
            #"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
            #"{"model":"m","messages":[{"role":"system","content":"a"},{"role":"user","content":[{"type":"text","text":"b"}]}],"temperature":0,"max_tokens":50,"top_p":0.9,"seed":-7,"stop":["\n\n"],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{}}}}]}"#,
            #"{"model":"m","messages":[{"role":"assistant","content":"","tool_calls":[{"id":"1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"1","content":"x"}]}"#,
            #"{"model":"m\u00e9","messages":[{"role":"user","content":"caf\u00e9 \ud83d\ude00 \"q\" \\ \/ \b\f\r\t"}],"temperature":2.0,"max_completion_tokens":1}"#,
            "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"日本語 and emoji 😀\"}],\"n\":1e2,\"x\":null,\"y\":[true,false,{}]}",
        ]
        for text in accepted {
            let result = try #require(scan(text), "\(text)")
            let request = try ChatRequest.parse(ByteBuffer(string: text))
            #expect(result.stream == request.stream && result.includeUsage == request.includeUsage, "\(text)")
            #expect(scannedUpstreamBody(text, result) == (try decodedUpstreamBody(text)), "\(text)")
        }
    }

    @Test func leavesEverythingElseToTheDecodingPath() {
        let declined = [
            "", "   ", "[]", "null", #"{"model":"m","messages":[{"role":"user","content":"hi"}]} x"#,
            #"{"model":"m","messages":[{"role":"user","content":"hi"}]"#,  // truncated
            #"{"messages":[{"role":"user","content":"hi"}]}"#, #"{"model":"","messages":[{"role":"user"}]}"#,
            #"{"model":"m","messages":[]}"#, #"{"model":"m","messages":[{"content":"x"}]}"#, #"{"model":"m","messages":[{"role":""}]}"#,
            #"{"model":"m","messages":[{"role":"user"}],"temperature":3}"#, #"{"model":"m","messages":[{"role":"user"}],"temperature":null}"#,
            #"{"model":"m","messages":[{"role":"user"}],"max_tokens":0}"#, #"{"model":"m","messages":[{"role":"user"}],"max_tokens":5.0}"#,
            #"{"model":"m","messages":[{"role":"user"}],"stream":null}"#, #"{"model":"m","messages":[{"role":"user"}],"stream":"yes"}"#,
            #"{"model":"m","messages":[{"role":"user"}],"stream_options":{"include_usage":true}}"#,  // not a stream: rebuilt
            #"{"model":"m","messages":[{"role":"user"}],"stream":true,"stream_options":{"include_usage":false}}"#,
            #"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[]}]}"#,  // needs smoothing
            #"{"model":"m","messages":[{"role":"assistant","tool_calls":[]}]}"#,
            #"{"model":"m","model":"n","messages":[{"role":"user"}]}"#, #"{"mod\u0065l":"m","messages":[{"role":"user"}]}"#,
            #"{"model":"m","messages":[{"role":"user","content":"\ud800"}]}"#, #"{"model":"m","messages":[{"role":"user","content":"\x"}]}"#,
            "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"tab\there\"}]}",
            #"{"model":"m","messages":[{"role":"user"}],"n":01}"#, #"{"model":"m","messages":[{"role":"user"}],"n":1.}"#,
            #"{"model":"m","messages":[{"role":"user"}],"n":tru}"#, #"{"model":"m","messages":[{"role":"user"}],}"#,
        ]
        for text in declined {
            #expect(scan(text) == nil, "\(text)")
        }
        // Invalid UTF-8 (an overlong slash, a lone continuation byte, an encoded surrogate).
        for bad: [UInt8] in [[0xC0, 0xAF], [0x80], [0xED, 0xA0, 0x80]] {
            var bytes = Array(#"{"model":"m","messages":[{"role":"user","content":""#.utf8)
            bytes += bad + Array(#""}]}"#.utf8)
            #expect(bytes.withUnsafeBytes(ChatRequestScan.scan) == nil)
        }
    }

    /// Mutated requests: whenever the scan accepts one, the decoding path accepts it too and
    /// would forward the same bytes.
    @Test func neverAcceptsWhatTheDecoderRejects() throws {
        let seed = Array(#"{"model":"m","messages":[{"role":"user","content":"h\u00e9 \"x\""},{"role":"assistant","content":"","tool_calls":[1]}],"stream":true,"temperature":1.5,"max_tokens":7}"#.utf8)
        let alphabet = Array(#"{}[]",:\ 0123456789.eE+-tfnul"#.utf8) + [0x00, 0x0a, 0x80, 0xC3, 0xA9]
        var generator = SplitMix(state: 42)
        var accepted = 0
        for _ in 0..<20_000 {
            var bytes = seed
            for _ in 0..<(1 + Int(generator.next() % 3)) {
                let position = Int(generator.next() % UInt64(bytes.count))
                switch generator.next() % 3 {
                case 0: bytes[position] = alphabet[Int(generator.next() % UInt64(alphabet.count))]
                case 1: bytes.remove(at: position)
                default: bytes.insert(alphabet[Int(generator.next() % UInt64(alphabet.count))], at: position)
                }
            }
            guard let result = bytes.withUnsafeBytes(ChatRequestScan.scan) else { continue }
            accepted += 1
            let text = String(decoding: bytes, as: UTF8.self)
            let request = try ChatRequest.parse(ByteBuffer(bytes: bytes))
            #expect(result.stream == request.stream && result.includeUsage == request.includeUsage, "\(text)")
            #expect(scannedUpstreamBody(text, result) == (try decodedUpstreamBody(text)), "\(text)")
        }
        #expect(accepted > 100)  // the mutations do exercise the accepting side
    }
}

struct SplitMix {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
