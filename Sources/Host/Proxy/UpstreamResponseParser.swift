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

    /// The most bytes a head (or the trailer section) may take: 80 KiB, as a client's head may.
    static let maxHeadBytes = 80 * 1024
    /// The most bytes a chunk-size line may take, extensions included.
    static let maxChunkLineBytes = 4 * 1024

    private var state = State.idle
    private var trailerBytes = 0
    /// How far into the unconsumed input the search for the pending line's or head's end has
    /// already looked, so that a head or line arriving in many small reads is searched once,
    /// not again from its start with every read.
    private var scanned = 0
    /// The head being searched has had its status line (`scanned` is past it).
    private var sawStatusLine = false

    /// A request has been sent: the next bytes are its response.
    mutating func expectResponse() {
        state = .head
        scanned = 0
        sawStatusLine = false
    }

    /// Whether the response being read ends only when the connection closes.
    var endsAtClose: Bool {
        if case .untilClose = state { return true }
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
                if let head { return .head(head) }  // else an interim response: read the next head
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
    private mutating func readLine(_ input: inout ByteBuffer, limit: Int, what: String) throws(MalformedUpstreamReply) -> ByteBuffer? {
        guard let newline = ByteSearch.find(0x0a, in: input, from: scanned) else {
            if input.readableBytes > limit { throw MalformedUpstreamReply(reason: "\(what) is longer than \(limit) bytes") }
            scanned = input.readableBytes
            return nil
        }
        scanned = 0
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
        let parsed = line.withUnsafeReadableBytes { bytes -> Result<Int, MalformedUpstreamReply> in
            var size = 0
            var index = 0
            var significant = 0  // digits after leading zeros, which the grammar allows (1*HEXDIG)
            while index < bytes.count, let value = hexValue(bytes[index]) {
                if size != 0 || value != 0 { significant += 1 }
                // 15 hex digits: far beyond any body the gateway reads, and no overflow.
                guard significant <= 15 else { return .failure(MalformedUpstreamReply(reason: "chunk size is too large")) }
                size = size << 4 | value
                index += 1
            }
            guard index > 0 else { return .failure(MalformedUpstreamReply(reason: "chunk size line does not start with a hexadecimal size")) }
            while index < bytes.count, bytes[index] == UInt8(ascii: " ") || bytes[index] == UInt8(ascii: "\t") { index += 1 }
            guard index == bytes.count || bytes[index] == UInt8(ascii: ";") else {
                return .failure(MalformedUpstreamReply(reason: "chunk size line has something other than an extension after the size"))
            }
            return .success(size)
        }
        return try parsed.get()
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
        guard let length = headLength(input) else {
            if input.readableBytes > Self.maxHeadBytes { throw MalformedUpstreamReply(reason: "head is longer than \(Self.maxHeadBytes) bytes") }
            return nil
        }
        guard length <= Self.maxHeadBytes else { throw MalformedUpstreamReply(reason: "head is longer than \(Self.maxHeadBytes) bytes") }
        // Parsed in place, line by line, over the read's bytes (no slice or string per line).
        let parsed = input.withUnsafeReadableBytes { bytes -> Result<(minorVersion: Int, status: Int, fields: HeadFields), MalformedUpstreamReply> in
            var lines = Lines(bytes: UnsafeRawBufferPointer(rebasing: bytes[..<length]))
            var statusLine = lines.next()
            while let line = statusLine, line.isEmpty { statusLine = lines.next() }  // blank lines before it are skipped
            var fields = HeadFields()
            do throws(MalformedUpstreamReply) {
                guard let statusLine else { throw MalformedUpstreamReply(reason: "head has no status line") }
                let (minorVersion, status) = try Self.statusLine(statusLine)
                while let line = lines.next(), !line.isEmpty { try fields.add(line) }
                return .success((minorVersion, status, fields))
            } catch {
                return .failure(error)
            }
        }
        input.moveReaderIndex(forwardBy: length)
        let (minorVersion, status, fields) = try parsed.get()
        if status < 200 {
            // 101 would switch protocols, which no request of the pass-through asks for.
            guard status != 101 else { throw MalformedUpstreamReply(reason: "101 Switching Protocols was not asked for") }
            return .some(nil)
        }
        var keepAlive = minorVersion == 1 ? !fields.close : fields.keepAliveToken && !fields.close
        if status == 204 || status == 304 {
            state = .fixed(0)
        } else if fields.transferEncoding {
            // Both framings, or a coding in an HTTP/1.0 reply (which has none: RFC 9112 6.1):
            // the coding decides this body, and the connection is not trusted again.
            if fields.contentLength != nil || minorVersion == 0 { keepAlive = false }
            if fields.lastCodingIsChunked {
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
    private mutating func headLength(_ input: ByteBuffer) -> Int? {
        let (from, statusLineSeen) = (scanned, sawStatusLine)
        let (length, searched, sawStatusLine) = input.withUnsafeReadableBytes { bytes -> (Int?, Int, Bool) in
            // Resumes at the first line not yet complete at the last search.
            var lines = Lines(bytes: bytes, from: from)
            var sawStatusLine = statusLineSeen
            while let line = lines.next() {
                if line.isEmpty, sawStatusLine { return (lines.consumed, 0, false) }
                if !line.isEmpty { sawStatusLine = true }
            }
            return (nil, lines.consumed, sawStatusLine)
        }
        scanned = searched
        self.sawStatusLine = sawStatusLine
        return length
    }

    /// The minor version and the status of a status line (`HTTP/1.x SP 3DIGIT [SP reason]`).
    private static func statusLine(_ bytes: UnsafeRawBufferPointer) throws(MalformedUpstreamReply) -> (Int, Int) {
        func isDigit(_ byte: UInt8) -> Bool { byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") }
        guard bytes.count >= 12, memcmp(bytes.baseAddress!, "HTTP/1.", 7) == 0, bytes[7] == UInt8(ascii: "0") || bytes[7] == UInt8(ascii: "1"),
            bytes[8] == UInt8(ascii: " "), isDigit(bytes[9]), isDigit(bytes[10]), isDigit(bytes[11]),
            bytes.count == 12 || bytes[12] == UInt8(ascii: " ")
        else {
            let shown = String(decoding: bytes.prefix(40), as: UTF8.self).unicodeScalars
                .map { $0.value < 0x20 || $0.value == 0x7f ? "?" : String($0) }.joined()
            throw MalformedUpstreamReply(reason: "status line is not HTTP/1.x: \"\(shown)\"")
        }
        let status = Int(bytes[9] - 48) * 100 + Int(bytes[10] - 48) * 10 + Int(bytes[11] - 48)
        guard status >= 100 else { throw MalformedUpstreamReply(reason: "status \(status) is not a status") }
        return (Int(bytes[7] - 48), status)
    }
}

/// The lines of a head's bytes, each without its CR LF (or bare LF); a last line without its
/// line break is not returned.
private struct Lines {
    let bytes: UnsafeRawBufferPointer
    /// The bytes through the end of the last line returned.
    private(set) var consumed = 0

    init(bytes: UnsafeRawBufferPointer, from start: Int = 0) {
        self.bytes = bytes
        consumed = start
    }

    mutating func next() -> UnsafeRawBufferPointer? {
        guard consumed < bytes.count, let base = bytes.baseAddress, let hit = memchr(base + consumed, 0x0a, bytes.count - consumed) else { return nil }
        let start = consumed
        var end = base.distance(to: UnsafeRawPointer(hit))
        consumed = end + 1
        if end > start, bytes[end - 1] == UInt8(ascii: "\r") { end -= 1 }
        return UnsafeRawBufferPointer(rebasing: bytes[start..<end])
    }
}

/// The header fields of a response head that the pass-through uses; the rest are checked for
/// syntax and dropped.
private struct HeadFields {
    var contentLength: Int?
    /// A `Transfer-Encoding` field came.
    var transferEncoding = false
    /// The last transfer coding listed is `chunked`.
    var lastCodingIsChunked = false
    /// A Transfer-Encoding element so far was chunked.
    private var sawChunked = false
    var close = false
    var keepAliveToken = false
    var contentType: String?
    var retryAfter: String?

    mutating func add(_ line: UnsafeRawBufferPointer) throws(MalformedUpstreamReply) {
        let first = line[0]
        guard first != UInt8(ascii: " "), first != UInt8(ascii: "\t") else {
            throw MalformedUpstreamReply(reason: "header field line begins with whitespace (obsolete line folding)")
        }
        guard let colon = line.firstIndex(of: UInt8(ascii: ":")) else {
            throw MalformedUpstreamReply(reason: "header field line has no colon")
        }
        let name = UnsafeRawBufferPointer(rebasing: line[..<colon])
        guard !name.isEmpty, name.allSatisfy(Self.isTokenCharacter) else {
            throw MalformedUpstreamReply(reason: "header field name \"\(String(decoding: name.prefix(40), as: UTF8.self))\" is not a token")
        }
        let value = Self.trimmed(UnsafeRawBufferPointer(rebasing: line[(colon + 1)...]))
        guard !value.contains(0), !value.contains(UInt8(ascii: "\r")) else {
            throw MalformedUpstreamReply(reason: "header field \(String(decoding: name, as: UTF8.self)) has a NUL or a bare CR in its value")
        }
        switch name.count {
        case 14 where Self.named(name, "content-length"):
            try addContentLength(value)
        case 17 where Self.named(name, "transfer-encoding"):
            transferEncoding = true
            // The last element that is not empty (a list may have empty ones) of the last field.
            var elements = Elements(of: value)
            var last: UnsafeRawBufferPointer?
            while let element = elements.next() {
                guard !element.isEmpty else { continue }
                // Chunked twice would need decoding twice; no sender may apply it so (RFC 9112 7).
                if element.count == 7, Self.named(element, "chunked") {
                    guard !sawChunked else { throw MalformedUpstreamReply(reason: "Transfer-Encoding applies chunked more than once") }
                    sawChunked = true
                }
                last = element
            }
            if let last { lastCodingIsChunked = last.count == 7 && Self.named(last, "chunked") }
        case 10 where Self.named(name, "connection"):
            var tokens = Elements(of: value)
            while let token = tokens.next() {
                if token.count == 5, Self.named(token, "close") { close = true }
                if token.count == 10, Self.named(token, "keep-alive") { keepAliveToken = true }
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
    private mutating func addContentLength(_ value: UnsafeRawBufferPointer) throws(MalformedUpstreamReply) {
        var elements = Elements(of: value)
        while let element = elements.next() {
            // Leading zeros are allowed (1*DIGIT); 15 digits after them cannot overflow.
            let digits = element.drop { $0 == UInt8(ascii: "0") }
            guard !element.isEmpty, digits.count <= 15, element.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) else {
                throw MalformedUpstreamReply(reason: "Content-Length \"\(String(decoding: value.prefix(40), as: UTF8.self))\" is not a length")
            }
            let length = digits.reduce(0) { $0 * 10 + Int($1 - UInt8(ascii: "0")) }
            if let contentLength, contentLength != length {
                throw MalformedUpstreamReply(reason: "Content-Length values disagree (\(contentLength) and \(length))")
            }
            contentLength = length
        }
    }

    /// The comma-separated elements of a list value, each trimmed of spaces and tabs (empty
    /// ones included).
    private struct Elements {
        let value: UnsafeRawBufferPointer
        var start = 0

        init(of value: UnsafeRawBufferPointer) {
            self.value = value
        }

        mutating func next() -> UnsafeRawBufferPointer? {
            guard start <= value.count else { return nil }
            var end = start
            while end < value.count, value[end] != UInt8(ascii: ",") { end += 1 }
            defer { start = end + 1 }
            return trimmed(UnsafeRawBufferPointer(rebasing: value[start..<end]))
        }
    }

    fileprivate static func trimmed(_ bytes: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer {
        var start = 0
        var end = bytes.count
        while start < end, bytes[start] == UInt8(ascii: " ") || bytes[start] == UInt8(ascii: "\t") { start += 1 }
        while end > start, bytes[end - 1] == UInt8(ascii: " ") || bytes[end - 1] == UInt8(ascii: "\t") { end -= 1 }
        return UnsafeRawBufferPointer(rebasing: bytes[start..<end])
    }

    /// Whether `name` is `lowercase` in any case (`lowercase` is ASCII lower case, of the same length).
    private static func named(_ name: UnsafeRawBufferPointer, _ lowercase: StaticString) -> Bool {
        let expected = lowercase.utf8Start
        for index in 0..<name.count {
            let byte = name[index]
            let folded = byte >= 0x41 && byte <= 0x5a ? byte | 0x20 : byte
            if folded != expected[index] { return false }
        }
        return true
    }

    /// RFC 9110's `tchar`.
    private static func isTokenCharacter(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"): true
        default: "!#$%&'*+.^_`|~".utf8.contains(byte)
        }
    }
}
