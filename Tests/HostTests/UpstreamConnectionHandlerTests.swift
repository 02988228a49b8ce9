// The pass-through's upstream connection handler: reads held for a client that cannot take more, and never left held on an idle connection.
import Foundation
import NIOCore
import NIOEmbedded
import Testing

@testable import Host

@Suite struct UpstreamConnectionHandlerTests {
    /// Counts the reads that get past the handler toward the socket.
    private final class ReadCounter: ChannelOutboundHandler {
        typealias OutboundIn = Any
        var reads = 0

        func read(context: ChannelHandlerContext) {
            reads += 1
            context.read()
        }
    }

    private final class Recorder: UpstreamResponseDelegate {
        var ended: Bool?
        func upstreamHead(_ head: UpstreamReplyHead) {}
        func upstreamBody(_ buffer: ByteBuffer) {}
        func upstreamEnd(keepAlive: Bool) { ended = keepAlive }
        func upstreamFailed(_ failure: UpstreamFailure) {}
    }

    private func connection() throws -> (EmbeddedChannel, ReadCounter, UpstreamConnectionHandler) {
        let channel = EmbeddedChannel()
        let counter = ReadCounter()
        let handler = UpstreamConnectionHandler()
        try channel.pipeline.syncOperations.addHandlers(counter, handler)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 8000)).wait()
        return (channel, counter, handler)
    }

    @Test func idleConnectionsBelowTheOneInUseExpire() throws {
        // After a burst, light traffic keeps taking the most recently released connection: the
        // ones below it were checked for age only when taken, so they stayed open for good.
        let loop = EmbeddedEventLoop()
        let lifetime = TimeAmount.milliseconds(300)
        let pool = UpstreamConnectionPool(
            eventLoop: loop, target: try #require(UpstreamTarget(url: "http://127.0.0.1:8000")), connectTimeout: .seconds(1),
            flusher: RoundFlusher(eventLoop: loop), idleLifetime: lifetime)
        func released() throws -> EmbeddedChannel {
            let channel = EmbeddedChannel(loop: loop)
            let handler = UpstreamConnectionHandler()
            try channel.pipeline.syncOperations.addHandler(handler)
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 8000)).wait()
            // Adopted as the pool's own: closing it (expired) runs the pool's `forget` at once,
            // which crashed the sweep that was closing it.
            pool.release(pool.adopt(channel, handler: handler))
            return channel
        }
        let old = [try released(), try released()]
        usleep(UInt32(lifetime.nanoseconds / 1000) + 50_000)
        let recent = try released()
        #expect(pool.idleCount == 3)
        // The newest is taken and used again, as light traffic would; the two below it expire.
        let busy = try #require(pool.takeIdle())
        #expect(busy.channel === recent)
        pool.release(busy)
        loop.advanceTime(to: .now())
        #expect(pool.idleCount == 1)
        #expect(!old[0].isActive && !old[1].isActive && recent.isActive)
        usleep(UInt32(lifetime.nanoseconds / 1000) + 50_000)
        loop.advanceTime(to: .now())
        #expect(pool.idleCount == 0 && !recent.isActive)
    }

    @Test func readsAreHeldWhileTheClientCannotTakeMoreThenResumed() throws {
        // NIO asks only outbound handlers whether to read: as an inbound handler it held nothing.
        let (channel, counter, handler) = try connection()
        handler.holdReads(true)
        channel.read()
        #expect(counter.reads == 0)
        handler.holdReads(false)
        #expect(counter.reads == 1)
        channel.read()
        #expect(counter.reads == 2)
    }

    @Test func aReplyEndingWhileReadsAreHeldLeavesTheConnectionReading() throws {
        // The reply's end and the client's back-pressure in the same read: the connection went
        // back to the pool still held, and the next exchange's reply was never read.
        let (channel, counter, handler) = try connection()
        let recorder = Recorder()
        handler.delegate = recorder
        handler.send(ByteBuffer(string: "POST /v1/chat/completions HTTP/1.1\r\n\r\n"), then: nil, flushingWith: RoundFlusher(eventLoop: channel.embeddedEventLoop))
        handler.holdReads(true)
        channel.read()
        #expect(counter.reads == 0)
        try channel.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"))
        #expect(recorder.ended == true)
        #expect(counter.reads == 1)  // the held read went out when the reply ended
        channel.read()
        #expect(counter.reads == 2)
    }
}
