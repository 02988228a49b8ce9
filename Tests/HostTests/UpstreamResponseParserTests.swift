// The pass-through's upstream response parser: framing, the head's values, and what it refuses.
import NIOCore
import Testing

@testable import Host

@Suite struct UpstreamResponseParserTests {
    /// What a response parsed to: its head, its body bytes and whether it ended, and the bytes
    /// left after its end.
    struct Parsed: Equatable {
        var status: Int?
        var keepAlive: Bool?
        var contentType: String?
        var retryAfter: String?
        var body = ""
        var ended = false
    }

    /// Parses `text` delivered in reads of the given sizes (the whole text at once when empty),
    /// keeping unconsumed bytes for the next read as the connection handler does.
    static func parse(_ text: String, reads sizes: [Int] = [], closed: Bool = false) throws(MalformedUpstreamReply) -> Parsed {
        var parser = UpstreamResponseParser()
        parser.expectResponse()
        var parsed = Parsed()
        var bytes = Array(text.utf8)[...]
        var pending = ByteBuffer()
        var reads = sizes.isEmpty ? [bytes.count] : sizes
        while !bytes.isEmpty || !reads.isEmpty {
            let size = reads.isEmpty ? bytes.count : min(reads.removeFirst(), bytes.count)
            pending.writeBytes(bytes.prefix(size))
            bytes = bytes.dropFirst(size)
            while let event = try parser.next(&pending) {
                switch event {
                case .head(let head):
                    #expect(parsed.status == nil, "a second head")
                    parsed.status = head.status
                    parsed.keepAlive = head.keepAlive
                    parsed.contentType = head.contentType
                    parsed.retryAfter = head.retryAfter
                case .body(let body):
                    #expect(!parsed.ended)
                    parsed.body += String(buffer: body)
                case .end:
                    parsed.ended = true
                }
            }
            pending.discardReadBytes()
            if bytes.isEmpty { break }
        }
        if closed, parser.endsAtClose { parsed.ended = true }
        return parsed
    }

    static let json = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\nServer: x\r\n\r\n{\"id\":\"a\"}\n"
    static let chunked =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        + "9\r\ndata: a\n\n\r\n" + "9;ext=1\r\ndata: b\n\n\r\n" + "0\r\nX-Trailer: t\r\n\r\n"

    @Test func aLengthFramedReplyIsReadWhole() throws {
        let parsed = try Self.parse(Self.json)
        #expect(parsed == Parsed(status: 200, keepAlive: true, contentType: "application/json", body: "{\"id\":\"a\"}\n", ended: true))
    }

    @Test func aChunkedStreamIsReadWithItsTrailers() throws {
        let parsed = try Self.parse(Self.chunked)
        #expect(parsed == Parsed(status: 200, keepAlive: true, contentType: "text/event-stream", body: "data: a\n\ndata: b\n\n", ended: true))
    }

    static let interim = "\r\nHTTP/1.1 100 Continue\r\nX-A: 1\r\n\r\n" + json

    /// Whatever the reads' boundaries, the same response: split at every byte, and a byte a read
    /// (the search for a head's or a line's end resumes where the last read left it).
    @Test(arguments: [json, chunked, interim])
    func everySplitParsesTheSame(text: String) throws {
        let whole = try Self.parse(text)
        for split in 1..<text.utf8.count {
            #expect(try Self.parse(text, reads: [split]) == whole, "split at \(split)")
        }
        #expect(try Self.parse(text, reads: Array(repeating: 1, count: text.utf8.count)) == whole)
    }

    @Test func anInterimResponseIsSkipped() throws {
        let parsed = try Self.parse("HTTP/1.1 100 Continue\r\n\r\n" + Self.json)
        #expect(parsed.status == 200 && parsed.ended && parsed.body == "{\"id\":\"a\"}\n")
    }

    @Test func anErrorReplyKeepsItsRetryAfter() throws {
        let parsed = try Self.parse("HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 2\r\n\r\n{}")
        #expect(parsed == Parsed(status: 429, keepAlive: true, retryAfter: "7", body: "{}", ended: true))
    }

    @Test(arguments: [204, 304])
    func noContentHasNoBody(status: Int) throws {
        let parsed = try Self.parse("HTTP/1.1 \(status) X\r\nContent-Length: 5\r\n\r\n")
        #expect(parsed.status == status && parsed.ended && parsed.body.isEmpty)
    }

    @Test func aBodyWithoutLengthEndsWithTheConnection() throws {
        let open = try Self.parse("HTTP/1.1 200 OK\r\n\r\nabc")
        #expect(open == Parsed(status: 200, keepAlive: false, body: "abc", ended: false))
        #expect(try Self.parse("HTTP/1.1 200 OK\r\n\r\nabc", closed: true).ended)
        // A transfer coding other than chunked last: also read to the close.
        #expect(try Self.parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc").keepAlive == false)
    }

    @Test func keepAliveFollowsVersionAndConnection() throws {
        #expect(try Self.parse("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").keepAlive == false)
        #expect(try Self.parse("HTTP/1.1 200 OK\r\nConnection: Upgrade, CLOSE\r\nContent-Length: 0\r\n\r\n").keepAlive == false)
        #expect(try Self.parse("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keepAlive == false)
        #expect(try Self.parse("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n").keepAlive == true)
        // Both framings: the chunked coding reads this one, and the connection is not trusted again.
        let both = try Self.parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n")
        #expect(both == Parsed(status: 200, keepAlive: false, body: "ab", ended: true))
        // A coding in an HTTP/1.0 reply, which has none (RFC 9112 6.1): read, and the connection closed.
        let old = try Self.parse("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n")
        #expect(old == Parsed(status: 200, keepAlive: false, body: "ab", ended: true))
    }

    @Test func bareLineFeedsAndLeadingBlankLinesAreRead() throws {
        let parsed = try Self.parse("\r\nHTTP/1.1 200 OK\nContent-Length: 2\n\n{}")
        #expect(parsed == Parsed(status: 200, keepAlive: true, body: "{}", ended: true))
    }

    @Test func lengthsWithLeadingZerosAreRead() throws {
        // The grammar is 1*DIGIT and 1*HEXDIG: the zeros were counted against the 15-digit cap.
        #expect(try Self.parse("HTTP/1.1 200 OK\r\nContent-Length: 0000000000000000002\r\n\r\n{}").body == "{}")
        let chunked = try Self.parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0000000000000000002\r\n{}\r\n00000000000000000\r\n\r\n")
        #expect(chunked.body == "{}" && chunked.ended)
    }

    @Test func repeatedEqualLengthsAreOneLength() throws {
        #expect(try Self.parse("HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\n{}").body == "{}")
    }

    @Test(arguments: [
        ("HTTP/2 200 OK\r\n\r\n", "status line is not HTTP/1.x: \"HTTP/2 200 OK\""),
        ("SSH-2.0-OpenSSH_9.2\r\n\r\n", "status line is not HTTP/1.x: \"SSH-2.0-OpenSSH_9.2\""),
        ("HTTP/1.1 2000 OK\r\n\r\n", "status line is not HTTP/1.x: \"HTTP/1.1 2000 OK\""),
        ("HTTP/1.1 101 Switching Protocols\r\n\r\n", "101 Switching Protocols was not asked for"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "Content-Length values disagree (1 and 2)"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 1, 3\r\n\r\n", "Content-Length values disagree (1 and 3)"),
        ("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length \"-1\" is not a length"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n", "Content-Length \"0x10\" is not a length"),
        ("HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n", "header field line begins with whitespace (obsolete line folding)"),
        ("HTTP/1.1 200 OK\r\nContent-Length : 1\r\n\r\n", "header field name \"Content-Length \" is not a token"),
        ("HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "header field line has no colon"),
        ("HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", "header field X has a NUL or a bare CR in its value"),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size line does not start with a hexadecimal size"),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2x\r\n", "chunk size line has something other than an extension after the size"),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000\r\n", "chunk size is too large"),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n001000000000000000\r\n", "chunk size is too large"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 01000000000000000\r\n\r\n", "Content-Length \"01000000000000000\" is not a length"),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", "chunk data is longer than its size"),
        ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}x", "bytes came while no response was due"),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", "Transfer-Encoding applies chunked more than once"),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding applies chunked more than once"),
    ])
    func malformedRepliesAreRefusedWithTheirReason(text: String, reason: String) {
        #expect(throws: MalformedUpstreamReply(reason: reason)) { try Self.parse(text) }
    }

    @Test func anEndlessHeadIsRefused() {
        let head = "HTTP/1.1 200 OK\r\n" + String(repeating: "X-Filler: \(String(repeating: "f", count: 90))\r\n", count: 1000)
        #expect(throws: MalformedUpstreamReply(reason: "head is longer than 81920 bytes")) { try Self.parse(head, reads: [4096]) }
    }

    @Test func anEndlessChunkSizeLineIsRefused() {
        let text = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;" + String(repeating: "e", count: 5000)
        #expect(throws: MalformedUpstreamReply(reason: "chunk size line is longer than 4096 bytes")) { try Self.parse(text) }
    }
}
