// Unit tests for JSONText, the gateway's JSON writer: what it writes must read back as what it was given.
import Foundation
import Testing

@testable import Host

struct JSONTextTests {
    /// Writes `value`, reads it back with JSONSerialization, and compares as Foundation does.
    private func roundTrip(_ value: Any) throws -> Any {
        try JSONSerialization.jsonObject(with: JSONText.data(value), options: [.fragmentsAllowed])
    }

    /// A value's canonical bytes (sorted keys, booleans told from numbers), to compare two values.
    private func canonical(_ value: Any) -> [UInt8] {
        var bytes: [UInt8] = []
        CanonicalJSON.append(value, to: &bytes)
        return bytes
    }

    @Test func parsedRequestsReadBackAsTheyWere() throws {
        let text = #"""
            {"model":"m","stream":false,"temperature":0.7,"top_p":1,"seed":-42,"big":9007199254740993,"tiny":1e-7,"huge":1.5e300,
             "flags":[true,false,null,0,1],"messages":[{"role":"user","content":"quote \" backslash \\ slash / tab \t nl \n cr \r bell \u0007 nul \u0000 é 😀 \u2028"}],
             "nested":{"a":{"b":[[],{}]}},"empty":""}
            """#
        let parsed = try JSONSerialization.jsonObject(with: Data(text.utf8))
        let again = try roundTrip(parsed)
        #expect(canonical(again) == canonical(parsed))
        let body = try #require(again as? [String: Any])
        // Booleans stay booleans (not 1 and 0), integers exact, doubles the same double.
        #expect(JSONNumbers.bool((body["flags"] as! [Any])[0]) == true)
        #expect(JSONNumbers.bool((body["flags"] as! [Any])[3]) == nil)
        #expect((body["big"] as? NSNumber)?.int64Value == 9_007_199_254_740_993)
        #expect(JSONNumbers.double(body["tiny"]!) == 1e-7)
        #expect(JSONNumbers.double(body["temperature"]!) == 0.7)
        #expect((body["messages"] as! [[String: Any]])[0]["content"] as? String
            == "quote \" backslash \\ slash / tab \t nl \n cr \r bell \u{7} nul \u{0} é 😀 \u{2028}")
    }

    @Test func swiftValuesAreWrittenAsJSON() throws {
        let built: [String: Any] = [
            "id": "chatcmpl-1", "created": 1_700_000_000, "index": 0, "ratio": 0.25, "done": true, "none": NSNull(),
            "choices": [["delta": ["content": "Hi"], "finish_reason": NSNull()]], "names": ["a", "b"], "counts": [1, 2],
        ]
        let text = String(decoding: JSONText.data(built), as: UTF8.self)
        #expect(!text.contains("\\/"))
        let again = try #require(try roundTrip(built) as? [String: Any])
        #expect(JSONNumbers.bool(again["done"]!) == true)
        #expect(JSONNumbers.int(again["created"]!) == 1_700_000_000)
        #expect(JSONNumbers.double(again["ratio"]!) == 0.25)
        #expect(again["none"] is NSNull)
        #expect((again["names"] as? [String]) == ["a", "b"])
        #expect(((again["choices"] as? [[String: Any]])?[0]["delta"] as? [String: Any])?["content"] as? String == "Hi")
    }

    @Test func narrowerSwiftTypesAndFoundationClassesAreWrittenToo() throws {
        let mixed: [String: Any] = [
            "map": ["a": "b"] as [String: String], "ints": [Int64(5), Int64(-6)], "float": Float(0.5), "u8": UInt8(7),
            "nsarray": NSArray(array: [1, "x"]), "nsdict": NSDictionary(dictionary: ["k": 2]), "nsstring": NSString(string: "s"),
            "nested": [["deep": [true]]] as [[String: [Bool]]],
        ]
        let again = try #require(try roundTrip(mixed) as? [String: Any])
        #expect((again["map"] as? [String: String]) == ["a": "b"])
        #expect((again["ints"] as? [Any])?.compactMap(JSONNumbers.int) == [5, -6])
        #expect(JSONNumbers.double(again["float"]!) == 0.5)
        #expect(JSONNumbers.int(again["u8"]!) == 7)
        #expect((again["nsarray"] as? [Any])?.count == 2 && (again["nsarray"] as? [Any])?.last as? String == "x")
        #expect(JSONNumbers.int((again["nsdict"] as? [String: Any])?["k"] ?? "") == 2)
        #expect(again["nsstring"] as? String == "s")
        #expect(JSONNumbers.bool((((again["nested"] as? [[String: Any]])?[0]["deep"]) as? [Any])?[0] ?? 0) == true)
    }

    @Test func randomDocumentsReadBackAsTheyWere() throws {
        // A fixed seed, so a failure reproduces: nested objects and arrays of strings (any code
        // point, control characters and quotes included), integers, doubles, booleans and nulls.
        var random = SplitMix(state: 0x6A7E_4005E)
        func string() -> String {
            var scalars = String.UnicodeScalarView()
            for _ in 0..<random.below(12) {
                let pick = random.below(4)
                let value: UInt32 =
                    pick == 0 ? UInt32(random.below(0x20)) : pick == 1 ? [0x22, 0x5C, 0x2F, 0x7F][random.below(4)]
                    : pick == 2 ? UInt32(0x20 + random.below(0x5F)) : UInt32(0xA0 + random.below(0x1F000))
                if let scalar = Unicode.Scalar(value) { scalars.append(scalar) }
            }
            return String(scalars)
        }
        func value(depth: Int) -> Any {
            switch random.below(depth > 3 ? 6 : 8) {
            case 0: return string()
            case 1: return Int(bitPattern: UInt(random.next())) >> random.below(60)
            case 2: return Double(bitPattern: random.next() & 0x7FEF_FFFF_FFFF_FFFF) * (random.below(2) == 0 ? 1 : -1)
            case 3: return random.below(2) == 0
            case 4: return NSNull()
            case 5: return Double(random.below(1000)) / 8
            case 6: return (0..<random.below(5)).map { _ in value(depth: depth + 1) }
            default: return Dictionary((0..<random.below(5)).map { _ in (string(), value(depth: depth + 1)) }, uniquingKeysWith: { a, _ in a })
            }
        }
        for _ in 0..<500 {
            let document: [String: Any] = ["v": value(depth: 0)]
            // The oracle is what JSONSerialization's own writer reads back as: its reader is not
            // exact for every double (2.2554625431355176e-71 reads back 1 ulp off), whoever wrote it.
            let expected = try JSONSerialization.jsonObject(with: JSONSerialization.data(withJSONObject: document))
            #expect(canonical(try roundTrip(document)) == canonical(expected), "\(String(decoding: JSONText.data(document), as: UTF8.self))")
        }
    }

    @Test func escapesAreTheShortOnesAndControlCharactersAreUnicodeEscapes() {
        #expect(String(decoding: JSONText.data(["k": "a\"b\\c\nd\u{1}e/f"]), as: UTF8.self) == #"{"k":"a\"b\\c\nd\u0001e/f"}"#)
        #expect(String(decoding: JSONText.data(["n": Double.nan, "i": -Double.infinity]), as: UTF8.self).contains("null"))
        #expect(String(decoding: JSONText.data([Any]()), as: UTF8.self) == "[]")
        #expect(String(decoding: JSONText.data([String: Any]()), as: UTF8.self) == "{}")
        let missing: Int? = nil
        let present: Int? = 3
        #expect(String(decoding: JSONText.data(["a": missing as Any]), as: UTF8.self) == #"{"a":null}"#)
        #expect(String(decoding: JSONText.data(["a": present as Any]), as: UTF8.self) == #"{"a":3}"#)
        let wrappedNull: NSNull? = NSNull()
        #expect(String(decoding: JSONText.data(["a": wrappedNull as Any]), as: UTF8.self) == #"{"a":null}"#)
        let wrappedBool: NSNumber? = NSNumber(value: true)
        #expect(String(decoding: JSONText.data(["a": wrappedBool as Any]), as: UTF8.self) == #"{"a":true}"#)
    }
}


/// The error body every refusal carries, written member by member.
struct OpenAIErrorBodyTests {
    @Test func membersInSortedOrderEscapedAndCodeAndParamNullWhenUnset() throws {
        let error = OpenAIError(.tooManyRequests, "rate limit \"exceeded\"\n/ retry", code: "rate_limit_exceeded")
        #expect(String(decoding: error.body(requestID: "r-1"), as: UTF8.self)
            == #"{"error":{"code":"rate_limit_exceeded","message":"rate limit \"exceeded\"\n/ retry","param":null,"request_id":"r-1","type":"rate_limit_error"}}"#)
        let field = OpenAIError(.badRequest, "'stop' must be a string", code: "invalid_stop", param: "stop")
        #expect(String(decoding: field.body(requestID: "r-2"), as: UTF8.self)
            == #"{"error":{"code":"invalid_stop","message":"'stop' must be a string","param":"stop","request_id":"r-2","type":"invalid_request_error"}}"#)
        // As OpenAI's: code and param present as null; no request id when there is none.
        let bare = OpenAIError(.badGateway, "upstream failed")
        #expect(String(decoding: bare.body(requestID: ""), as: UTF8.self) == #"{"error":{"code":null,"message":"upstream failed","param":null,"type":"api_error"}}"#)
        let parsed = try #require(try JSONSerialization.jsonObject(with: error.body(requestID: nil)) as? [String: [String: Any]])
        #expect(parsed["error"]?["message"] as? String == "rate limit \"exceeded\"\n/ retry" && parsed["error"]?["request_id"] == nil)
        #expect(parsed["error"]?["param"] is NSNull)
    }
}

extension SplitMix {
    /// A number from 0 below `bound`.
    mutating func below(_ bound: Int) -> Int { Int(next() % UInt64(bound)) }
}
