// The pass-through's hand-serialized bytes: chunk framing, response heads, access-line numbers.
import NIOCore
import Testing

@testable import Host

@Suite struct ResponseBytesTests {
    @Test(arguments: [1, 9, 15, 16, 255, 256, 4095, 4096, 65_537, 1_048_576])
    func chunksAreFramedWithTheirHexSize(size: Int) {
        let payload = [UInt8](repeating: UInt8(ascii: "x"), count: size)
        var chunk = ChunkedBody.makeBuffer(capacity: size)
        chunk.writeBytes(payload)
        ChunkedBody.frame(&chunk)
        let expected = Array((String(size, radix: 16) + "\r\n").utf8) + payload + Array("\r\n".utf8)
        #expect(chunk.readableBytesView.elementsEqual(expected))
    }

    @Test func anEmptyChunkStaysEmpty() {
        var chunk = ChunkedBody.makeBuffer(capacity: 8)
        ChunkedBody.frame(&chunk)
        #expect(chunk.readableBytes == 0)  // a zero-size chunk would end the body
    }

    /// A stream's head shares its first events' buffer: joined, it sits right before the chunk's
    /// size line (or, unframed for HTTP/1.0, right before the events), whatever the head's
    /// length against the headroom.
    @Test(arguments: [true, false], ["HTTP/1.1 200 OK\r\n\r\n", "HTTP/1.1 200 OK\r\nX-Request-ID: \(String(repeating: "r", count: 300))\r\n\r\n", "H"])
    func aHeadJoinsTheEventsInItsBuffer(framed: Bool, headText: String) {
        var buffer = ByteBufferAllocator().buffer(capacity: headText.utf8.count + ChunkedBody.capacity(for: 9))
        buffer.writeString(headText)
        ChunkedBody.reserveHeadroom(in: &buffer)
        #expect(ChunkedBody.holdsHead(buffer))
        buffer.writeString("data: x\n\n")
        ChunkedBody.seal(&buffer, framed: framed, last: false)
        #expect(String(buffer: buffer) == headText + (framed ? "9\r\ndata: x\n\n\r\n" : "data: x\n\n"))
    }

    @Test func aPlainChunkHoldsNoHeadAndSealsWithTheLastChunk() {
        var chunk = ChunkedBody.makeBuffer(capacity: 9)
        #expect(!ChunkedBody.holdsHead(chunk))
        chunk.writeString("data: x\n\n")
        ChunkedBody.seal(&chunk, framed: true, last: true)
        #expect(String(buffer: chunk) == "9\r\ndata: x\n\n\r\n0\r\n\r\n")
    }

    @Test func responseHeadsAreSerializedInOrder() {
        var head = ResponseHead(version: .http1_1, status: 200)
        head.add("Content-Type", "application/json")
        head.add("X-Request-ID", "r-1")
        let body = ByteBuffer(string: "{}")
        #expect(String(buffer: head.finish(appending: body)) == "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-ID: r-1\r\n\r\n{}")
        var old = ResponseHead(version: .http1_0, status: 429)
        #expect(String(buffer: old.finish()) == "HTTP/1.0 429 Too Many Requests\r\n\r\n")
    }

    @Test func latenciesAreMillisecondsWithThreeDecimals() {
        #expect(JSONLogHandler.milliseconds(.zero) == "0.000")
        #expect(JSONLogHandler.milliseconds(.microseconds(7)) == "0.007")
        #expect(JSONLogHandler.milliseconds(.microseconds(1005)) == "1.005")
        #expect(JSONLogHandler.milliseconds(.nanoseconds(12_345_999)) == "12.345")
        #expect(JSONLogHandler.milliseconds(.seconds(61)) == "61000.000")
    }

    @Test func decimalsAreWrittenWithoutStrings() {
        for value in [0, 7, 10, 99, 100, 200, 404, 499, 1_000_000, Int.max, -5, Int.min] {
            var bytes: [UInt8] = []
            JSONLogHandler.appendDecimal(value, to: &bytes)
            #expect(String(decoding: bytes, as: UTF8.self) == String(value))
        }
    }
}
