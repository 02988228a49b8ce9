// A one-pass check of a chat request's JSON text, for requests that can be forwarded as they are.

/// What the chat pass-through needs from a valid request it can forward unchanged, read in one
/// strict pass over the bytes instead of decoding them (Foundation's decoder was the largest
/// single cost of a proxied request).
///
/// `scan` accepts only what `ChatRequest.parse` accepts and `OpenAIBackend.forwardable` would
/// forward without rebuilding: strict RFC 8259 JSON (valid UTF-8, escapes, numbers), a
/// non-empty `model` string, a non-empty `messages` array of objects with a non-empty string
/// `role` and no `tool_calls` beside a missing or null `content`, `temperature` in 0...2,
/// positive integer `max_tokens`/`max_completion_tokens`, a boolean `stream`, and
/// `stream_options` only as `{"include_usage": true}` on a stream. For anything else — errors,
/// unusual spellings, duplicate keys that matter — it returns nil and the caller takes the
/// decoding path, which gives the precise error or rebuilds the body.
struct ChatRequestScan: Equatable {
    var stream = false
    /// `stream_options.include_usage` is true (the client wants the usage chunk).
    var includeUsage = false

    /// The body to send upstream: the client's bytes, or with `stream_options` spliced in
    /// after the opening brace (so the gateway can count a stream's tokens).
    var upstreamPrefix: String? {
        stream && !includeUsage ? OpenAIBackend.usageRequest : nil
    }

    static func scan(_ bytes: UnsafeRawBufferPointer) -> ChatRequestScan? {
        var scanner = Scanner(bytes: bytes)
        return scanner.request()
    }
}

/// Whether bytes are one JSON value, checked strictly (RFC 8259: valid UTF-8, escapes,
/// numbers) in one pass without decoding, whitespace around it allowed. The scan's limits hold
/// (nesting past 64 levels, a number over 32 characters or with an exponent over 3 digits):
/// past them it says false, and a caller that must be exact decodes instead.
enum JSONSyntax {
    static func isValid(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var scanner = Scanner(bytes: bytes)
        guard scanner.value(depth: 0) else { return false }
        scanner.skipWhitespace()
        return scanner.index == bytes.count
    }
}

/// Whether bytes hold one whole JSON object or array: every string closed, every bracket
/// matched, nothing but whitespace after it. What is inside is not judged, so what strict
/// parsers refuse but clients read (a lone surrogate escape, `NaN`, `-Infinity`, a number past
/// `Double`) passes; it tells a reply cut short from one a strict parser merely dislikes.
enum JSONStructure {
    static func isWhole(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var depth = 0
        var inString = false
        var escaped = false
        var ended = false
        for byte in bytes {
            let isSpace = byte == 0x20 || byte == 0x0a || byte == 0x0d || byte == 0x09
            if ended {
                guard isSpace else { return false }
            } else if inString {
                if escaped {
                    escaped = false
                } else if byte == UInt8(ascii: "\\") {
                    escaped = true
                } else if byte == UInt8(ascii: "\"") {
                    inString = false
                }
            } else if byte == UInt8(ascii: "\"") {
                guard depth > 0 else { return false }
                inString = true
            } else if byte == UInt8(ascii: "{") || byte == UInt8(ascii: "[") {
                depth += 1
            } else if byte == UInt8(ascii: "}") || byte == UInt8(ascii: "]") {
                depth -= 1
                guard depth >= 0 else { return false }
                ended = depth == 0
            } else if depth == 0, !isSpace {
                return false  // a top-level scalar, or text before the container
            }
        }
        return ended
    }
}

private struct Scanner {
    let bytes: UnsafeRawBufferPointer
    var index = 0
    /// Whether the last string read had an escape in it.
    private var sawEscape = false
    static let maxDepth = 64

    init(bytes: UnsafeRawBufferPointer) {
        self.bytes = bytes
    }

    private var current: UInt8? { index < bytes.count ? bytes[index] : nil }

    mutating func skipWhitespace() {
        while let byte = current, byte == 0x20 || byte == 0x0a || byte == 0x0d || byte == 0x09 { index += 1 }
    }

    private mutating func consume(_ byte: UInt8) -> Bool {
        skipWhitespace()
        guard current == byte else { return false }
        index += 1
        return true
    }

    /// The top-level request object.
    mutating func request() -> ChatRequestScan? {
        var result = ChatRequestScan()
        // The tracked keys seen so far, one bit each (a repeated one goes to the decoder).
        var seen: UInt8 = 0
        var hasModel = false, hasMessages = false, streamOptionsIncludeUsage: Bool?
        let parsed = object(depth: 1) { scanner, key in
            if let bit = Self.tracked.firstIndex(of: key) {
                guard seen & (1 << bit) == 0 else { return false }
                seen |= 1 << bit
            }
            switch key {
            case "model":
                guard let length = scanner.string(), length > 0 else { return false }
                hasModel = true
            case "messages":
                guard scanner.messages() else { return false }
                hasMessages = true
            case "temperature":
                guard let value = scanner.numberValue(), (0...2).contains(value) else { return false }
            case "max_tokens", "max_completion_tokens":
                guard scanner.positiveInteger() else { return false }
            case "stream":
                guard let flag = scanner.boolean() else { return false }
                result.stream = flag
            case "stream_options":
                guard let include = scanner.streamOptions() else { return false }
                streamOptionsIncludeUsage = include
            default:
                guard scanner.value(depth: 2) else { return false }
            }
            return true
        }
        skipWhitespace()
        guard parsed, index == bytes.count, hasModel, hasMessages else { return nil }
        if let include = streamOptionsIncludeUsage {
            // Anything but a stream asking for usage has its body rebuilt by the decoding path.
            guard result.stream, include else { return nil }
            result.includeUsage = true
        }
        return result
    }

    static let tracked = ["model", "messages", "temperature", "max_tokens", "max_completion_tokens", "stream", "stream_options"]

    /// `{"include_usage": <bool>}` and nothing else.
    private mutating func streamOptions() -> Bool? {
        var include: Bool?
        let parsed = object(depth: 2) { scanner, key in
            guard key == "include_usage", include == nil, let flag = scanner.boolean() else { return false }
            include = flag
            return true
        }
        return parsed ? include : nil
    }

    /// A non-empty array of message objects, each with a non-empty string role, none needing
    /// the `content: null` smoothing.
    private mutating func messages() -> Bool {
        var count = 0
        // One message's keys so far, for the duplicate check: the usual ones as bits, any
        // others in an array (rare, so allocated only when one appears; a linear search).
        var usualKeys: UInt8 = 0
        var otherKeys: [String] = []
        let parsed = array(depth: 2) { scanner in
            count += 1
            var role = false, toolCalls = false, content = false, contentIsNull = false
            usualKeys = 0
            otherKeys.removeAll(keepingCapacity: true)
            let ok = scanner.object(depth: 3) { scanner, key in
                let bit: UInt8? =
                    switch key {
                    case "role": 1
                    case "content": 2
                    case "tool_calls": 4
                    case "name": 8
                    case "tool_call_id": 16
                    default: nil
                    }
                if let bit {
                    guard usualKeys & bit == 0 else { return false }
                    usualKeys |= bit
                } else {
                    guard !otherKeys.contains(key) else { return false }
                    otherKeys.append(key)
                }
                switch key {
                case "role":
                    guard let length = scanner.string(), length > 0 else { return false }
                    role = true
                case "content":
                    content = true
                    contentIsNull = scanner.null()
                    if !contentIsNull { return scanner.value(depth: 4) }
                case "tool_calls":
                    toolCalls = true
                    return scanner.value(depth: 4)
                default:
                    return scanner.value(depth: 4)
                }
                return true
            }
            return ok && role && !(toolCalls && (!content || contentIsNull))
        }
        return parsed && count > 0
    }

    // MARK: JSON grammar

    /// An object; `member` reads each value (the scanner is at it) and says whether it is fine.
    private mutating func object(depth: Int, member: (inout Scanner, String) -> Bool) -> Bool {
        guard depth <= Self.maxDepth, consume(UInt8(ascii: "{")) else { return false }
        if consume(UInt8(ascii: "}")) { return true }
        while true {
            skipWhitespace()
            guard let key = plainKey(), consume(UInt8(ascii: ":")) else { return false }
            skipWhitespace()
            guard member(&self, key) else { return false }
            if consume(UInt8(ascii: ",")) { continue }
            return consume(UInt8(ascii: "}"))
        }
    }

    private mutating func array(depth: Int, element: (inout Scanner) -> Bool) -> Bool {
        guard depth <= Self.maxDepth, consume(UInt8(ascii: "[")) else { return false }
        if consume(UInt8(ascii: "]")) { return true }
        while true {
            skipWhitespace()
            guard element(&self) else { return false }
            if consume(UInt8(ascii: ",")) { continue }
            return consume(UInt8(ascii: "]"))
        }
    }

    /// Any JSON value.
    mutating func value(depth: Int) -> Bool {
        skipWhitespace()
        switch current {
        case UInt8(ascii: "{"): return object(depth: depth) { scanner, _ in scanner.value(depth: depth + 1) }
        case UInt8(ascii: "["): return array(depth: depth) { scanner in scanner.value(depth: depth + 1) }
        case UInt8(ascii: "\""): return string() != nil
        case UInt8(ascii: "t"): return literal("true")
        case UInt8(ascii: "f"): return literal("false")
        case UInt8(ascii: "n"): return literal("null")
        default: return number() != nil
        }
    }

    private mutating func literal(_ word: StaticString) -> Bool {
        let length = word.utf8CodeUnitCount
        guard index + length <= bytes.count else { return false }
        for offset in 0..<length where bytes[index + offset] != word.utf8Start[offset] { return false }
        index += length
        return true
    }

    private mutating func boolean() -> Bool? {
        if literal("true") { return true }
        if literal("false") { return false }
        return nil
    }

    private mutating func null() -> Bool { literal("null") }

    /// A key without escapes (keys with escapes take the decoding path).
    private mutating func plainKey() -> String? {
        let start = index + 1
        guard let length = string(), !sawEscape else { return nil }
        return String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<(start + length)]), as: UTF8.self)
    }

    /// A string; returns its length in bytes as written (escapes counted as written), or nil.
    mutating func string() -> Int? {
        guard current == UInt8(ascii: "\"") else { return nil }
        index += 1
        sawEscape = false
        let start = index
        while let byte = current {
            switch byte {
            case UInt8(ascii: "\""):
                index += 1
                return index - 1 - start
            case UInt8(ascii: "\\"):
                sawEscape = true
                guard escape() else { return nil }
            case ..<0x20:
                return nil
            case ..<0x80:
                index += 1
            default:
                guard utf8Sequence() else { return nil }
            }
        }
        return nil
    }

    private mutating func escape() -> Bool {
        index += 1
        guard let byte = current else { return false }
        index += 1
        switch byte {
        case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"), UInt8(ascii: "b"), UInt8(ascii: "f"), UInt8(ascii: "n"),
            UInt8(ascii: "r"), UInt8(ascii: "t"):
            return true
        case UInt8(ascii: "u"):
            guard let unit = hex4() else { return false }
            switch unit {
            case 0xD800...0xDBFF:
                // A high surrogate must be followed by an escaped low one.
                guard literal("\\u"), let low = hex4(), (0xDC00...0xDFFF).contains(low) else { return false }
                return true
            case 0xDC00...0xDFFF: return false
            default: return true
            }
        default:
            return false
        }
    }

    private mutating func hex4() -> UInt32? {
        guard index + 4 <= bytes.count else { return nil }
        var value: UInt32 = 0
        for _ in 0..<4 {
            let byte = bytes[index]
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: return nil
            }
            value = value << 4 | UInt32(digit)
            index += 1
        }
        return value
    }

    /// One well-formed UTF-8 sequence of two to four bytes (no overlongs, surrogates or values
    /// past U+10FFFF).
    private mutating func utf8Sequence() -> Bool {
        let lead = bytes[index]
        let length: Int
        var low: UInt8 = 0x80, high: UInt8 = 0xBF
        switch lead {
        case 0xC2...0xDF: length = 2
        case 0xE0: length = 3; low = 0xA0
        case 0xE1...0xEC, 0xEE...0xEF: length = 3
        case 0xED: length = 3; high = 0x9F
        case 0xF0: length = 4; low = 0x90
        case 0xF1...0xF3: length = 4
        case 0xF4: length = 4; high = 0x8F
        default: return false
        }
        guard index + length <= bytes.count, (low...high).contains(bytes[index + 1]) else { return false }
        for offset in 2..<max(2, length) where !(0x80...0xBF).contains(bytes[index + offset]) { return false }
        index += length
        return true
    }

    /// A number in RFC 8259's grammar; returns the text's range. Very long ones take the
    /// decoding path (its number types decide what they mean).
    private mutating func number() -> Range<Int>? {
        let start = index
        if current == UInt8(ascii: "-") { index += 1 }
        guard let first = current, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(first) else { return nil }
        index += 1
        if first != UInt8(ascii: "0") { digits() }
        if current == UInt8(ascii: ".") {
            index += 1
            guard digits() > 0 else { return nil }
        }
        if current == UInt8(ascii: "e") || current == UInt8(ascii: "E") {
            index += 1
            if current == UInt8(ascii: "+") || current == UInt8(ascii: "-") { index += 1 }
            guard (1...3).contains(digits()) else { return nil }
        }
        guard index - start <= 32 else { return nil }
        return start..<index
    }

    @discardableResult
    private mutating func digits() -> Int {
        let start = index
        while let byte = current, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) { index += 1 }
        return index - start
    }

    /// A number's value (for range checks); nil for null or anything that is not a number.
    private mutating func numberValue() -> Double? {
        guard let range = number() else { return nil }
        return Double(String(decoding: UnsafeRawBufferPointer(rebasing: bytes[range]), as: UTF8.self))
    }

    /// A positive integer written as plain digits (other spellings take the decoding path).
    private mutating func positiveInteger() -> Bool {
        guard let first = current, (UInt8(ascii: "1")...UInt8(ascii: "9")).contains(first) else { return false }
        let count = digits()
        guard count <= 15, let next = current else { return false }
        return next != UInt8(ascii: ".") && next != UInt8(ascii: "e") && next != UInt8(ascii: "E")
    }
}
