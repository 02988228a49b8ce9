// The pass-through's responses as HTTP/1.x bytes: heads it serializes, chunk framing, and the handler that writes them.
internal import NIOCore
internal import NIOHTTP1

/// A response head being serialized: the status line, then fields in the order added.
///
/// The pass-through writes its responses as bytes, not as `HTTPResponseHead`s through NIO's
/// encoder: building `HTTPHeaders` and encoding them again cost more than the rest of the
/// answer. Every value added must be header-safe (no CR, LF or NUL): the pass-through only adds
/// constants, the request id (`RequestIDMiddleware.isAcceptable`), lengths, dates and
/// `HTTPFields` values (which HTTPTypes keeps clean).
struct ResponseHead {
    private(set) var bytes: ByteBuffer
    let status: Int

    /// Room for the heads the pass-through writes (about 200 bytes with the request id and date).
    static let typicalCapacity = 256

    /// - Parameter reason: the reason phrase, when NIO's table has none for `status` (499).
    init(version: HTTPVersion, status: Int, reason: String? = nil, capacity: Int = typicalCapacity) {
        self.status = status
        bytes = ByteBufferAllocator().buffer(capacity: capacity)
        bytes.writeStaticString(version.minor == 0 ? "HTTP/1.0 " : "HTTP/1.1 ")
        if status == 200 {
            bytes.writeStaticString("200 OK\r\n")
        } else {
            bytes.writeString("\(status) \(reason ?? HTTPResponseStatus(statusCode: status).reasonPhrase)\r\n")
        }
    }

    mutating func add(_ name: String, _ value: String) {
        bytes.writeString(name)
        bytes.writeStaticString(": ")
        bytes.writeString(value)
        bytes.writeStaticString("\r\n")
    }

    /// Ends the head with its empty line, followed by `body` when given, and returns the bytes.
    /// Mutating, so the bytes are written in place (a copy would share them and be copied on write).
    mutating func finish(appending body: ByteBuffer? = nil) -> ByteBuffer {
        bytes.writeStaticString("\r\n")
        if let body { bytes.writeImmutableBuffer(body) }
        return bytes
    }
}

/// HTTP/1.1 chunked framing for streamed bodies, written in place: a chunk is built in a buffer
/// that keeps room in front for its size line, so each chunk goes out as one buffer.
enum ChunkedBody {
    /// Room for the size line: up to 8 hex digits (4 GiB) and CRLF.
    private static let headroom = 10

    /// An empty chunk buffer whose readable bytes start after the headroom.
    static func makeBuffer(capacity: Int) -> ByteBuffer {
        var buffer = ByteBufferAllocator().buffer(capacity: Self.capacity(for: capacity))
        reserveHeadroom(in: &buffer)
        return buffer
    }

    /// The room a chunk of `content` bytes takes: headroom, content, its CRLF and a last chunk.
    static func capacity(for content: Int) -> Int {
        headroom + content + 2 + lastChunk.utf8CodeUnitCount
    }

    /// Leaves the headroom behind what `buffer` holds (nothing, or a response head that `seal`
    /// joins to the chunk): its readable bytes then start after it, empty.
    static func reserveHeadroom(in buffer: inout ByteBuffer) {
        buffer.moveWriterIndex(forwardBy: headroom)
        buffer.moveReaderIndex(to: buffer.writerIndex)
    }

    /// Whether a chunk buffer begins with a response head: one from `makeBuffer` has nothing
    /// before its headroom.
    static func holdsHead(_ buffer: ByteBuffer) -> Bool {
        buffer.readerIndex > headroom
    }

    /// Readies a chunk buffer for the wire: its readable bytes framed as one chunk when `framed`
    /// (HTTP/1.1; then the last chunk when `last`), behind the response head it may begin with.
    static func seal(_ buffer: inout ByteBuffer, framed: Bool, last: Bool) {
        let headLength = buffer.readerIndex - headroom
        if framed {
            frame(&buffer)
            if last { buffer.writeStaticString(lastChunk) }
        }
        if headLength > 0 { joinHead(length: headLength, to: &buffer) }
    }

    /// Moves the `length` bytes at the start of the buffer (a response head) up against its
    /// readable bytes (a framed chunk, or the unframed events of an HTTP/1.0 stream), which then
    /// begin with them: head and events go out as one buffer.
    private static func joinHead(length: Int, to buffer: inout ByteBuffer) {
        let start = buffer.readerIndex - length
        precondition(start >= 0, "no head of that length in front of the chunk")
        buffer.withVeryUnsafeMutableBytes { storage in
            // The ranges may overlap (a head longer than the gap): copyMemory moves like memmove.
            (storage.baseAddress! + start).copyMemory(from: storage.baseAddress!, byteCount: length)
        }
        buffer.moveReaderIndex(to: start)
    }

    /// Frames the readable bytes of a buffer from `makeBuffer` as one chunk (an empty one is
    /// left empty: a zero-size chunk would end the body).
    static func frame(_ chunk: inout ByteBuffer) {
        let size = chunk.readableBytes
        guard size > 0 else { return }
        // The size line, hex digits then CRLF, written backwards into the headroom.
        var start = chunk.readerIndex - 2
        precondition(start >= 8, "chunk buffer without headroom")
        chunk.setInteger(UInt16(0x0d0a), at: start)  // "\r\n", big-endian
        var rest = size
        repeat {
            start -= 1
            chunk.setInteger(Hex.digit(rest & 0xf), at: start)
            rest >>= 4
        } while rest > 0
        chunk.moveReaderIndex(to: start)
        chunk.writeStaticString("\r\n")
    }

    /// The last chunk, which ends a chunked body (no trailers).
    static let lastChunk: StaticString = "0\r\n\r\n"
}

/// The socket end of a pass-through connection's pipeline, below NIO's response encoder: the
/// pass-through writes its serialized responses here, while router responses go through the
/// encoder above it as usual. Added after any TLS handler, so its bytes are still encrypted.
final class RawResponseWriter: ChannelOutboundHandler, RemovableChannelHandler, RoundFlushable {
    typealias OutboundIn = IOData
    typealias OutboundOut = IOData

    private var context: ChannelHandlerContext?

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    /// Writes `bytes` (then `more`) toward the socket, unflushed: the pass-through flushes
    /// at the end of the loop's round (RoundFlusher).
    func write(_ bytes: ByteBuffer, then more: ByteBuffer? = nil) {
        context?.writeSerialized(bytes, then: more)
    }

    func flushNow() {
        context?.flush()
    }
}

extension ChannelHandlerContext {
    /// Writes already serialized bytes (then `more`) from this handler toward the socket,
    /// without flushing, for the handlers at the socket end whose outbound type is `IOData`
    /// (RawResponseWriter, UpstreamConnectionHandler).
    func writeSerialized(_ bytes: ByteBuffer, then more: ByteBuffer?) {
        write(NIOAny(IOData.byteBuffer(bytes)), promise: nil)
        if let more { write(NIOAny(IOData.byteBuffer(more)), promise: nil) }
    }
}
