// The pass-through's end-of-round flushes: while several exchanges are in progress, written bytes stay unflushed until the loop runs its tasks, then all go out in order.
import NIOCore
import NIOEmbedded
import Testing

@testable import Host

@Suite struct RoundFlusherTests {
    /// A channel on `loop` whose socket end is a RawResponseWriter, as on pass-through connections.
    private func connection(on loop: EmbeddedEventLoop) throws -> (EmbeddedChannel, RawResponseWriter) {
        let writer = RawResponseWriter()
        let channel = EmbeddedChannel(handler: writer, loop: loop)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return (channel, writer)
    }

    private func flushed(_ channel: EmbeddedChannel) throws -> [String] {
        var out: [String] = []
        while let data = try channel.readOutbound(as: IOData.self) {
            guard case .byteBuffer(let buffer) = data else { continue }
            out.append(String(buffer: buffer))
        }
        return out
    }

    /// A flusher on `loop` with two exchanges in progress, so that it holds flushes.
    private func busyFlusher(on loop: EmbeddedEventLoop) -> RoundFlusher {
        let flusher = RoundFlusher(eventLoop: loop)
        flusher.exchangeBegan()
        flusher.exchangeBegan()
        return flusher
    }

    @Test func aSingleExchangeIsFlushedAtOnce() throws {
        let loop = EmbeddedEventLoop()
        let flusher = RoundFlusher(eventLoop: loop)
        let (channel, writer) = try connection(on: loop)
        flusher.exchangeBegan()
        writer.write(ByteBuffer(string: "alone"))
        flusher.flushAtEndOfRound(writer)
        #expect(try flushed(channel) == ["alone"])
        // A second exchange begins: from now on flushes wait for the round's end.
        flusher.exchangeBegan()
        writer.write(ByteBuffer(string: "held"))
        flusher.flushAtEndOfRound(writer)
        #expect(try flushed(channel).isEmpty)
        loop.run()
        #expect(try flushed(channel) == ["held"])
        flusher.exchangeEnded()
        flusher.exchangeEnded()
        #expect(flusher.exchangesInProgress == 0)
        _ = try channel.finish()
    }

    @Test func writesGoOutTogetherWhenTheLoopRunsItsTasks() throws {
        let loop = EmbeddedEventLoop()
        let flusher = busyFlusher(on: loop)
        let (first, firstWriter) = try connection(on: loop)
        let (second, secondWriter) = try connection(on: loop)

        firstWriter.write(ByteBuffer(string: "a1"), then: ByteBuffer(string: "a2"))
        flusher.flushAtEndOfRound(firstWriter)
        secondWriter.write(ByteBuffer(string: "b"))
        flusher.flushAtEndOfRound(secondWriter)
        #expect(try flushed(first).isEmpty)
        #expect(try flushed(second).isEmpty)

        loop.run()
        #expect(try flushed(first) == ["a1", "a2"])
        #expect(try flushed(second) == ["b"])
        _ = try first.finish()
        _ = try second.finish()
    }

    @Test func aFlushHeldDuringTheFlushesGoesOutInTheNextTask() throws {
        let loop = EmbeddedEventLoop()
        let flusher = busyFlusher(on: loop)
        let (channel, writer) = try connection(on: loop)
        let (other, otherWriter) = try connection(on: loop)
        // Flushing the first writer makes more to write elsewhere (as a failed write that
        // closes a channel can make another exchange answer).
        let chained = ChainedFlush(inner: writer) {
            otherWriter.write(ByteBuffer(string: "later"))
            flusher.flushAtEndOfRound(otherWriter)
        }
        writer.write(ByteBuffer(string: "now"))
        flusher.flushAtEndOfRound(chained)

        loop.run()  // runs the held flush, and the task it schedules
        #expect(try flushed(channel) == ["now"])
        #expect(try flushed(other) == ["later"])
        _ = try channel.finish()
        _ = try other.finish()
    }

    @Test func aWriterThatLeftItsPipelineIsSkipped() throws {
        let loop = EmbeddedEventLoop()
        let flusher = busyFlusher(on: loop)
        let (channel, writer) = try connection(on: loop)
        writer.write(ByteBuffer(string: "unflushed"))
        flusher.flushAtEndOfRound(writer)
        try channel.pipeline.syncOperations.removeHandler(writer).wait()  // before the round ends
        loop.run()
        #expect(try flushed(channel).isEmpty)
        channel.flush()
        #expect(try flushed(channel) == ["unflushed"])  // the write itself was kept
        _ = try channel.finish()
    }
}

/// Flushes `inner`, then runs `after`.
private final class ChainedFlush: RoundFlushable {
    let inner: any RoundFlushable
    let after: () -> Void

    init(inner: any RoundFlushable, after: @escaping () -> Void) {
        self.inner = inner
        self.after = after
    }

    func flushNow() {
        inner.flushNow()
        after()
    }
}
