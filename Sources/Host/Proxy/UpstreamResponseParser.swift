// Reads the upstream's HTTP/1.x responses from the connection's bytes, for the chat pass-through.
internal import NIOCore
#if canImport(Glibc)
internal import Glibc
#endif

/// What the pass-through needs of an upstream response's head.
struct UpstreamReplyHead {
    /// The final status (interim 1xx responses are skipped, never reported).
    let status: Int
    /// The response allows the connection to carry another request once it has ended.
    let keepAlive: Bool
    let contentType: String?
    let retryAfter: String?
}

/// An upstream response that breaks HTTP/1.1's syntax or framing; its connection is closed.
struct MalformedUpstreamReply: Error, Equatable, CustomStringConvertible {
    let reason: String
    var description: String { "malformed HTTP response: \(reason)" }
}

/// An incremental parser of the responses to the pass-through's requests, one at a time, in
/// place of NIO's `HTTPResponseDecoder` behind a `ByteToMessageHandler`: that pair builds an
/// `HTTPHeaders` (a string per field), boxes every part in `NIOAny` and buffers reads of its
/// own, per request, for the handful of values the pass-through reads. This one keeps only those
/// values and hands the body on as slices of the reads, uncopied.
///
/// Framing follows RFC 9112 §6.3 for the response to a POST: no body for 1xx, 204 and 304;
/// chunked when the last transfer coding is `chunked`; else to the connection's close when
/// there is any other transfer coding; else `Content-Length` (several differing values are
/// an error); else to the close. Every request the pass-through sends is a POST, so no
/// response is to a HEAD.
///
/// The upstream is the operator's configured server, not an untrusted client, but its bytes
/// still decide where one response ends and the next begins on a reused connection, so the
/// framing is strict: a malformed length, chunk size or line, an obsolete folded line, or bytes
/// after a response ends are errors, never guesses.
struct UpstreamResponseParser {
    enum Event {
        case head(UpstreamReplyHead)
        /// Body bytes: a slice of the input.
        case body(ByteBuffer)
        case end
    }

    private enum State {
        /// No request is awaiting its response.
        case idle
        /// Reading the status line and header fields.
        case head
        /// This many body bytes are still to come (`0`: the response ends at the next call).
        case fixed(Int)
        case chunkSize
        case chunkData(Int)
        /// The line break that ends a chunk's data.
        case chunkDataEnd
        case trailers
        /// The body ends when the upstream closes the connection.
        case untilClose
    }

    /// The most bytes a head (or the trailer section) may take: 80 KiB, as NIO's decoder allows.
    static let maxHeadBytes = 80 * 1024
    /// The most bytes a chunk-size line may take, extensions included.
    static let maxChunkLineBytes = 4 * 1024

    private var state = State.idle
    private var trailerBytes = 0

    /// A request has been sent: the next bytes are its response.
    mutating func expectResponse() {
        state = .head
    }

    /// Whether the response being read ends only when the connection closes.
    var endsAtClose: Bool {
        if case .untilClose = state { return true }
        return false
    }

    /// Whether no response is being read (a byte now is one the upstream should not have sent).
    var isIdle: Bool {
        if case .idle = state { return true }
        return false
    }

    /// The next event from `input`, whose bytes it consumes; nil when it needs more bytes than
    /// `input` holds (the caller keeps what is left and offers it again with the next read).
    mutating func next(_ input: inout ByteBuffer) throws(MalformedUpstreamReply) -> Event? {
        while true {
            switch state {
            case .idle:
                guard input.readableBytes == 0 else { throw MalformedUpstreamReply(reason: "bytes came while no response was due") }
                return nil
            case .head:
                guard let head = try readHead(&input) else { return nil }
                if let head { return .head(head) }
            // An interim response (nil): read the next head.
            case .fixed(let remaining):
                if remaining == 0 {
                    state = .idle
                    return .end
                }
                guard input.readableBytes > 0 else { return nil }
                let taken = min(remaining, input.readableBytes)
                state = .fixed(remaining - taken)
                return .body(input.readSlice(length: taken)!)
            case .chunkSize:
                guard let line = try readLine(&input, limit: Self.maxChunkLineBytes, what: "chunk size line") else { return nil }
                let size = try Self.chunkSize(line)
                state = size == 0 ? .trailers : .chunkData(size)
                trailerBytes = 0
            case .chunkData(let remaining):
                guard input.readableBytes > 0 else { return nil }
                let taken = min(remaining, input.readableBytes)
                state = taken == remaining ? .chunkDataEnd : .chunkData(remaining - taken)
                return .body(input.readSlice(length: taken)!)
            case .chunkDataEnd:
                guard let first = input.getInteger(at: input.readerIndex, as: UInt8.self) else { return nil }
                if first == UInt8(ascii: "\n") {
                    input.moveReaderIndex(forwardBy: 1)
                } else if first == UInt8(ascii: "\r") {
                    guard let second = input.getInteger(at: input.readerIndex + 1, as: UInt8.self) else { return nil }
                    guard second == UInt8(ascii: "\n") else { throw MalformedUpstreamReply(reason: "chunk data is longer than its size") }
                    input.moveReaderIndex(forwardBy: 2)
                } else {
                    throw MalformedUpstreamReply(reason: "chunk data is longer than its size")
                }
                state = .chunkSize
            case .trailers:
                let before = input.readableBytes
                guard let line = try readLine(&input, limit: Self.maxHeadBytes - trailerBytes, what: "trailer section") else { return nil }
                trailerBytes += before - input.readableBytes
                if line.readableBytes == 0 {
                    state = .idle
                    return .end
                }
            case .untilClose:
                guard input.readableBytes > 0 else { return nil }
                return .body(input.readSlice(length: input.readableBytes)!)
            }
        }
    }

    // MARK: Lines

    /// The next line of `input` (without its CR LF, or a bare LF), consumed; nil (nothing
    /// consumed) until a whole line is there.
    private func readLine(_ input: inout ByteBuffer, limit: Int, what: String) throws(MalformedUpstreamReply) -> ByteBuffer? {
        let found = input.withUnsafeReadableBytes { bytes -> Int? in
            guard let base = bytes.baseAddress, let hit = memchr(base, 0x0a, bytes.count) else { return nil }
            return base.distance(to: UnsafeRawPointer(hit))
        }
        guard let newline = found else {
            if input.readableBytes > limit { throw MalformedUpstreamReply(reason: "\(what) is longer than \(limit) bytes") }
            return nil
        }
        guard newline < limit else { throw MalformedUpstreamReply(reason: "\(what) is longer than \(limit) bytes") }
        var line = input.readSlice(length: newline)!
        input.moveReaderIndex(forwardBy: 1)
        if line.readableBytes > 0, line.getInteger(at: line.writerIndex - 1, as: UInt8.self) == UInt8(ascii: "\r") {
            line.moveWriterIndex(to: line.writerIndex - 1)
        }
        return line
    }

    /// A chunk's size from its line (hexadecimal, then optional extensions, which are ignored).
    private static func chunkSize(_ line: ByteBuffer) throws(MalformedUpstreamReply) -> Int {
        var size = 0
        var digits = 0
        var rest = line.readableBytesView[...]
        while let byte = rest.first, let value = hexValue(byte) {
            // 15 hex digits: far beyond any body the gateway reads, and no overflow.
            guard digits < 15 else { throw MalformedUpstreamReply(reason: "chunk size is too large") }
            size = size << 4 | value
            digits += 1
            rest = rest.dropFirst()
        }
        guard digits > 0 else { throw MalformedUpstreamReply(reason: "chunk size line does not start with a hexadecimal size") }
        while let byte = rest.first, byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") { rest = rest.dropFirst() }
        guard rest.isEmpty || rest.first == UInt8(ascii: ";") else {
            throw MalformedUpstreamReply(reason: "chunk size line has something other than an extension after the size")
        }
        return size
    }

    private static func hexValue(_ byte: UInt8) -> Int? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): Int(byte - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "f"): Int(byte - UInt8(ascii: "a") + 10)
        case UInt8(ascii: "A")...UInt8(ascii: "F"): Int(byte - UInt8(ascii: "A") + 10)
        default: nil
        }
    }

    // MARK: The head

    /// A whole head from `input`, consumed, with the state set for its body: `.some(nil)` for
    /// an interim (1xx) response, which the caller skips; nil (nothing consumed) until the
    /// head is complete.
    private mutating func readHead(_ input: inout ByteBuffer) throws(MalformedUpstreamReply) -> UpstreamReplyHead?? {
        guard let length = Self.headLength(input) else {
            if input.readableBytes > Self.maxHeadBytes { throw MalformedUpstreamReply(reason: "head is longer than \(Self.maxHeadBytes) bytes") }
            return nil
        }
        guard length <= Self.maxHeadBytes else { throw MalformedUpstreamReply(reason: "head is longer than \(Self.maxHeadBytes) bytes") }
        var head = input.readSlice(length: length)!
        var fields = Fields()
        var statusLine: ByteBuffer
        repeat {  // blank lines before it are skipped
            guard let line = try readLine(&head, limit: length, what: "status line") else { throw MalformedUpstreamReply(reason: "head has no status line") }
            statusLine = line
        } while statusLine.readableBytes == 0
        let (minorVersion, status) = try Self.statusLine(statusLine)
        while let line = try readLine(&head, limit: length, what: "header field"), line.readableBytes > 0 {
            try fields.add(line)
        }
        if status < 200 {
            // 101 would switch protocols, which no request of the pass-through asks for.
            guard status != 101 else { throw MalformedUpstreamReply(reason: "101 Switching Protocols was not asked for") }
            return .some(nil)
        }
        var keepAlive = minorVersion == 1 ? !fields.close : fields.keepAliveToken && !fields.close
        if status == 204 || status == 304 {
            state = .fixed(0)
        } else if let codings = fields.transferEncoding {
            // Both framings: the coding decides this body, and the connection is not trusted again.
            if fields.contentLength != nil { keepAlive = false }
            if Self.lastCodingIsChunked(codings) {
                state = .chunkSize
            } else {
                state = .untilClose
                keepAlive = false
            }
        } else if let length = fields.contentLength {
            state = .fixed(length)
        } else {
            state = .untilClose
            keepAlive = false
        }
        return .some(UpstreamReplyHead(status: status, keepAlive: keepAlive, contentType: fields.contentType, retryAfter: fields.retryAfter))
    }

    /// The length of the head at the start of `input` (through its blank line); nil until it
    /// is all there. Blank lines before the status line are part of it (and skipped).
    private static func headLength(_ input: ByteBuffer) -> Int? {
        input.withUnsafeReadableBytes { bytes -> Int? in
            guard let base = bytes.baseAddress else { return nil }
            var start = 0
            var sawStatusLine = false
            while start < bytes.count, let hit = memchr(base + start, 0x0a, bytes.count - start) {
                let end = base.distance(to: UnsafeRawPointer(hit))
                let empty = end == start || (end == start + 1 && bytes[start] == UInt8(ascii: "\r"))
                start = end + 1
                if empty, sawStatusLine { return start }
                if !empty { sawStatusLine = true }
            }
            return nil
        }
    }

    /// The minor version and the status of a status line (`HTTP/1.x SP 3DIGIT [SP reason]`).
    private static func statusLine(_ line: ByteBuffer) throws(MalformedUpstreamReply) -> (Int, Int) {
        let parsed = line.withUnsafeReadableBytes { bytes -> (Int, Int)? in
            func isDigit(_ byte: UInt8) -> Bool { byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") }
            guard bytes.count >= 12, memcmp(bytes.baseAddress!, "HTTP/1.", 7) == 0, bytes[7] == UInt8(ascii: "0") || bytes[7] == UInt8(ascii: "1"),
                bytes[8] == UInt8(ascii: " "), isDigit(bytes[9]), isDigit(bytes[10]), isDigit(bytes[11]),
                bytes.count == 12 || bytes[12] == UInt8(ascii: " ")
            else { return nil }
            return (Int(bytes[7] - 48), Int(bytes[9] - 48) * 100 + Int(bytes[10] - 48) * 10 + Int(bytes[11] - 48))
        }
        guard let (minorVersion, status) = parsed else {
            let shown = String(decoding: line.readableBytesView.prefix(40), as: UTF8.self).unicodeScalars
                .map { $0.value < 0x20 || $0.value == 0x7f ? "?" : String($0) }.joined()
            throw MalformedUpstreamReply(reason: "status line is not HTTP/1.x: \"\(shown)\"")
        }
        guard status >= 100 else { throw MalformedUpstreamReply(reason: "status \(status) is not a status") }
        return (minorVersion, status)
    }

    private static func lastCodingIsChunked(_ codings: String) -> Bool {
        guard let last = codings.split(separator: ",").last else { return false }
        return last.trimmingWhitespace().lowercased() == "chunked"
    }
}

/// The header fields of a response head that the pass-through uses; the rest are checked for
/// syntax and dropped.
private struct Fields {
    var contentLength: Int?
    var transferEncoding: String?
    var close = false
    var keepAliveToken = false
    var contentType: String?
    var retryAfter: String?

    mutating func add(_ line: ByteBuffer) throws(MalformedUpstreamReply) {
        let bytes = line.readableBytesView
        guard let first = bytes.first, first != UInt8(ascii: " "), first != UInt8(ascii: "\t") else {
            throw MalformedUpstreamReply(reason: "header field line begins with whitespace (obsolete line folding)")
        }
        guard let colon = bytes.firstIndex(of: UInt8(ascii: ":")) else {
            throw MalformedUpstreamReply(reason: "header field line has no colon")
        }
        let name = bytes[bytes.startIndex..<colon]
        guard !name.isEmpty, name.allSatisfy(Self.isTokenCharacter) else {
            throw MalformedUpstreamReply(reason: "header field name \"\(String(decoding: name.prefix(40), as: UTF8.self))\" is not a token")
        }
        var value = bytes[(colon + 1)...]
        while let byte = value.first, byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") { value = value.dropFirst() }
        while let byte = value.last, byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") { value = value.dropLast() }
        guard !value.contains(where: { $0 == 0 || $0 == UInt8(ascii: "\r") }) else {
            throw MalformedUpstreamReply(reason: "header field \(String(decoding: name, as: UTF8.self)) has a NUL or a bare CR in its value")
        }
        switch name.count {
        case 14 where Self.named(name, "content-length"):
            try addContentLength(value)
        case 17 where Self.named(name, "transfer-encoding"):
            let text = String(decoding: value, as: UTF8.self)
            transferEncoding = transferEncoding.map { "\($0), \(text)" } ?? text
        case 10 where Self.named(name, "connection"):
            for token in String(decoding: value, as: UTF8.self).split(separator: ",") {
                switch token.trimmingWhitespace().lowercased() {
                case "close": close = true
                case "keep-alive": keepAliveToken = true
                default: break
                }
            }
        case 12 where Self.named(name, "content-type"):
            contentType = contentType ?? String(decoding: value, as: UTF8.self)
        case 11 where Self.named(name, "retry-after"):
            retryAfter = retryAfter ?? String(decoding: value, as: UTF8.self)
        default:
            break
        }
    }

    /// One `Content-Length` field: a length, or a list of the same length repeated (RFC 9110
    /// §8.6); a second field must agree too.
    private mutating func addContentLength(_ value: ByteBufferView.SubSequence) throws(MalformedUpstreamReply) {
        for element in value.split(separator: UInt8(ascii: ","), omittingEmptySubsequences: false) {
            var digits = element[...]
            while let byte = digits.first, byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") { digits = digits.dropFirst() }
            while let byte = digits.last, byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") { digits = digits.dropLast() }
            guard !digits.isEmpty, digits.count <= 15, digits.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) else {
                throw MalformedUpstreamReply(reason: "Content-Length \"\(String(decoding: value.prefix(40), as: UTF8.self))\" is not a length")
            }
            let length = digits.reduce(0) { $0 * 10 + Int($1 - UInt8(ascii: "0")) }
            if let contentLength, contentLength != length {
                throw MalformedUpstreamReply(reason: "Content-Length values disagree (\(contentLength) and \(length))")
            }
            contentLength = length
        }
    }

    /// Whether `name` is `lowercase` in any case (`lowercase` is ASCII lower case, of the same length).
    private static func named(_ name: ByteBufferView.SubSequence, _ lowercase: StaticString) -> Bool {
        let expected = UnsafeRawBufferPointer(start: lowercase.utf8Start, count: lowercase.utf8CodeUnitCount)
        return zip(name, expected).allSatisfy { byte, wanted in byte == wanted || (byte >= 0x41 && byte <= 0x5a && byte | 0x20 == wanted) }
    }

    /// RFC 9110's `tchar`.
    private static func isTokenCharacter(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"): true
        default: "!#$%&'*+-.^_`|~".utf8.contains(byte)
        }
    }
}

extension Substring {
    fileprivate func trimmingWhitespace() -> Substring {
        var text = self
        while let first = text.first, first == " " || first == "\t" { text = text.dropFirst() }
        while let last = text.last, last == " " || last == "\t" { text = text.dropLast() }
        return text
    }
}
