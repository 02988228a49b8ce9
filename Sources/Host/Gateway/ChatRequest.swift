// A validated OpenAI chat-completion request, kept as JSON so unknown fields pass through.
internal import Crypto
internal import Foundation
internal import NIOCore

/// The client's `/v1/chat/completions` body, checked for the fields the gateway relies on.
struct ChatRequest: @unchecked Sendable {
    /// The whole request object as the client sent it (JSON-compatible Foundation values).
    var body: [String: Any]
    /// The request's JSON text as received, when it came over HTTP: backends that need no
    /// change to it forward these bytes instead of serialising `body` again.
    var raw: Data?
    var model: String
    var messages: [[String: Any]]
    var stream: Bool
    /// `stream_options.include_usage`: the client wants a final usage chunk.
    var includeUsage: Bool

    /// Parses and validates a request body.
    /// - Throws: `OpenAIError` 400 naming the field that is wrong.
    static func parse(_ buffer: ByteBuffer) throws -> ChatRequest {
        var request = try ChatRequest(body: RequestFields.object(buffer))
        request.raw = Data(buffer.readableBytesView)
        return request
    }

    /// Validates an already-decoded request object (also used for plugins' LLM calls).
    init(body: [String: Any]) throws {
        let invalid = RequestFields.invalid
        let model = try RequestFields.model(body)
        guard let messages = body["messages"] as? [Any] else {
            throw body["messages"] == nil
                ? RequestFields.missing("messages")
                : invalid("messages", "must be an array of message objects")
        }
        guard !messages.isEmpty else { throw invalid("messages", "must contain at least one message") }
        var checked: [[String: Any]] = []
        for (index, message) in messages.enumerated() {
            guard let message = message as? [String: Any], let role = message["role"] as? String, !role.isEmpty else {
                throw invalid("messages", "item \(index) must be an object with a string 'role'")
            }
            checked.append(message)
        }
        if let temperature = body["temperature"], !(temperature is NSNull) {
            guard let value = JSONNumbers.double(temperature), (0...2).contains(value) else {
                throw invalid("temperature", "must be a number between 0 and 2")
            }
        }
        for field in ["max_tokens", "max_completion_tokens"] { try RequestFields.checkPositiveInteger(body, field) }
        self.body = body
        self.model = model
        self.messages = checked
        self.stream = try RequestFields.stream(body)
        self.includeUsage = RequestFields.includeUsage(body)
    }

    /// `max_completion_tokens` (newer clients) or `max_tokens`. A null is no value, as OpenAI
    /// reads it: an SDK sends `max_completion_tokens: null` beside a `max_tokens` it means.
    var maxTokens: Int? {
        RequestFields.present(body, "max_completion_tokens", "max_tokens").flatMap(JSONNumbers.int)
    }

    /// Cache key over the model, messages and every sampling parameter: the whole request
    /// except how it is delivered (`stream`, `stream_options`) and who asks (`user`), in a
    /// canonical form (sorted keys), so a plugin's request and a client's with the same content
    /// share an entry. Where decoding may have merged what the upstream (sent the client's
    /// bytes) tells apart, the key is over those bytes too (see `CanonicalJSON.append`).
    func cacheKey(backend: String) -> String {
        var canonical: [UInt8] = Array(backend.utf8)
        canonical.append(0)
        canonical.reserveCapacity(raw?.count ?? 256)
        var keyed = body
        for field in ["stream", "stream_options", "user"] { keyed.removeValue(forKey: field) }
        var exact = true
        CanonicalJSON.append(keyed, to: &canonical, exact: &exact)
        if !exact, let raw {
            canonical.append(0)
            canonical.append(contentsOf: raw)
        }
        return Hex.string(SHA256.hash(data: canonical))
    }
}

/// The checks every completion request shares (chat and legacy text completions alike), each
/// failing with a 400 that names the field.
enum RequestFields {
    /// A 400 for `field`: `'field' <message>`, code `invalid_<field>`, param `field`.
    static func invalid(_ field: String, _ message: String) -> OpenAIError {
        OpenAIError(.badRequest, "'\(field)' \(message)", code: "invalid_\(field)", param: field)
    }

    /// A 400 for a required `field` that is missing: code `missing_<field>`, param `field`.
    static func missing(_ field: String) -> OpenAIError {
        OpenAIError(.badRequest, "missing required field '\(field)'", code: "missing_\(field)", param: field)
    }

    /// The value of the first of `fields` the body holds, a JSON null counting as absent (as
    /// OpenAI reads it; SDKs send nulls for parameters a caller passed as None).
    static func present(_ body: [String: Any], _ fields: String...) -> Any? {
        for field in fields {
            if let value = body[field], !(value is NSNull) { return value }
        }
        return nil
    }

    /// The request body as a JSON object.
    static func object(_ buffer: ByteBuffer) throws(OpenAIError) -> [String: Any] {
        let object: Any
        do {
            object = try JSONSerialization.jsonObject(with: Data(buffer.readableBytesView), options: [.fragmentsAllowed])
        } catch {
            throw OpenAIError(.badRequest, "request body is not valid JSON: \(JSONErrors.describe(error))", code: "invalid_json")
        }
        guard let body = object as? [String: Any] else {
            throw OpenAIError(.badRequest, "request body must be a JSON object", code: "invalid_json")
        }
        return body
    }

    /// `model`: required, a non-empty string.
    static func model(_ body: [String: Any]) throws(OpenAIError) -> String {
        guard let model = body["model"] as? String, !model.isEmpty else {
            throw body["model"] == nil
                ? missing("model")
                : invalid("model", "must be a non-empty string")
        }
        return model
    }

    /// `field`, when present and not null, must be a positive integer (`max_tokens` and kin).
    static func checkPositiveInteger(_ body: [String: Any], _ field: String) throws(OpenAIError) {
        guard let value = body[field], !(value is NSNull) else { return }
        guard let count = JSONNumbers.int(value), count > 0 else { throw invalid(field, "must be a positive integer") }
    }

    /// `stream`: true or false, absent meaning false.
    static func stream(_ body: [String: Any]) throws(OpenAIError) -> Bool {
        if let value = body["stream"], !(value is NSNull), JSONNumbers.bool(value) == nil { throw invalid("stream", "must be true or false") }
        return body["stream"].flatMap(JSONNumbers.bool) ?? false
    }

    /// `stream_options.include_usage`: the client wants a final usage chunk.
    static func includeUsage(_ body: [String: Any]) -> Bool {
        ((body["stream_options"] as? [String: Any])?["include_usage"]).flatMap(JSONNumbers.bool) ?? false
    }
}

/// A canonical byte form of decoded JSON (sorted keys, one spelling per number), for hashing.
enum CanonicalJSON {
    static func append(_ value: Any, to output: inout [UInt8]) {
        var exact = true
        append(value, to: &output, exact: &exact)
    }

    /// `exact` turns false where decoding may have merged values the JSON text told apart:
    /// integers past Int64 (decoded as Doubles, so 2^63+1 and 2^63+2 are one number), and
    /// object keys beyond ASCII (Swift's dictionary takes canonically equivalent strings, "é"
    /// composed and decomposed, as one key, keeping one value of two).
    static func append(_ value: Any, to output: inout [UInt8], exact: inout Bool) {
        switch value {
        case let text as String:
            output.append(UInt8(ascii: "\""))
            for byte in text.utf8 {
                if byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") { output.append(UInt8(ascii: "\\")) }
                output.append(byte)
            }
            output.append(UInt8(ascii: "\""))
        case let object as [String: Any]:
            output.append(UInt8(ascii: "{"))
            for (index, key) in object.keys.sorted().enumerated() {
                if index > 0 { output.append(UInt8(ascii: ",")) }
                if exact, key.utf8.contains(where: { $0 >= 0x80 }) { exact = false }
                append(key, to: &output, exact: &exact)
                output.append(UInt8(ascii: ":"))
                append(object[key]!, to: &output, exact: &exact)
            }
            output.append(UInt8(ascii: "}"))
        case let array as [Any]:
            output.append(UInt8(ascii: "["))
            for (index, element) in array.enumerated() {
                if index > 0 { output.append(UInt8(ascii: ",")) }
                append(element, to: &output, exact: &exact)
            }
            output.append(UInt8(ascii: "]"))
        case is NSNull:
            output.append(contentsOf: "null".utf8)
        default:
            if let flag = JSONNumbers.bool(value) {
                output.append(contentsOf: (flag ? "true" : "false").utf8)
            } else if let integer = value as? Int {
                // Exact, before the Double below rounds integers beyond 2^53 together.
                output.append(contentsOf: String(integer).utf8)
            } else if let number = JSONNumbers.double(value) {
                // Beyond 2^53, neighbouring integers are one Double.
                if abs(number) >= 9_007_199_254_740_992 { exact = false }
                // 1 and 1.0 are the same JSON number: spell integral values as integers.
                let text = number == number.rounded() && abs(number) < 1e15 ? String(Int(number)) : String(number)
                output.append(contentsOf: text.utf8)
            } else {
                output.append(contentsOf: String(describing: value).utf8)
            }
        }
    }
}

/// Foundation's JSON numbers arrive as NSNumber; booleans too. These tell them apart.
enum JSONNumbers {
    /// JSON booleans decode to an NSNumber whose objCType is "c"; JSON numbers never do.
    static func isBool(_ value: Any) -> Bool {
        guard let number = value as? NSNumber else { return false }
        return number.objCType.pointee == CChar(UInt8(ascii: "c"))
    }

    static func bool(_ value: Any) -> Bool? {
        isBool(value) ? (value as? NSNumber)?.boolValue : nil
    }

    static func double(_ value: Any) -> Double? {
        guard !isBool(value), let number = value as? NSNumber else { return nil }
        return number.doubleValue
    }

    static func int(_ value: Any) -> Int? {
        guard let number = double(value), number == number.rounded(), abs(number) < 1e15 else { return nil }
        return Int(number)
    }
}

enum JSONErrors {
    /// Foundation's JSON errors are verbose; keep the useful part on one line.
    static func describe(_ error: any Error) -> String {
        let nsError = error as NSError
        let detail = (nsError.userInfo[NSDebugDescriptionErrorKey] as? String) ?? nsError.localizedDescription
        return detail.replacingOccurrences(of: "\n", with: " ")
    }
}
