// Flushes the pass-through's writes once its event loop has handled every socket that was ready in the current round.
internal import NIOCore

/// A socket-end writer whose written bytes can be flushed later (RawResponseWriter toward a
/// client, UpstreamConnectionHandler toward the upstream).
protocol RoundFlushable: AnyObject {
    /// Flushes what was written; does nothing once the handler has left its pipeline.
    func flushNow()
}

/// One event loop's held flushes. The pass-through writes an answer (or an upstream request)
/// at once but flushes it only after the loop has handled all the sockets that one
/// `epoll_wait` reported ready: the writes to one peer then arrive together, and a peer woken
/// by the first finds the others already there instead of going back to sleep between them.
/// Measured on the benchmark (docs/PERFORMANCE.md): the upstream's and the client's sleeps and
/// wake-ups per request drop. A write waits only while the loop finishes its round, never for
/// a timer, and not at all while the loop serves a single exchange (one client at a time),
/// where no other write could join it: there, holding measured a few per cent slower.
///
/// Not thread-safe: used only on its loop. A connection that closes right after its answer
/// (`Connection: close`, HTTP/1.0, shutdown) must flush first itself: closing drops writes
/// not yet flushed.
final class RoundFlusher {
    private let eventLoop: any EventLoop
    private var due: [any RoundFlushable] = []
    /// The list being flushed, kept to reuse its storage.
    private var flushing: [any RoundFlushable] = []
    /// The loop's pass-through exchanges in progress. With one (a client at a time), no other
    /// write could join a held one, so holding would only delay it: it is flushed at once.
    private(set) var exchangesInProgress = 0

    init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    func exchangeBegan() {
        exchangesInProgress += 1
    }

    func exchangeEnded() {
        exchangesInProgress -= 1
    }

    /// Flushes `writer` when the loop has handled the rest of this round's ready sockets
    /// (NIO runs the loop's tasks after its I/O), or at once while the loop serves only one
    /// exchange.
    func flushAtEndOfRound(_ writer: any RoundFlushable) {
        guard exchangesInProgress > 1 else {
            writer.flushNow()
            return
        }
        due.append(writer)
        guard due.count == 1 else { return }
        // Strong: the flusher lives as long as its loop's pass-through state.
        eventLoop.assumeIsolated().execute { self.flushDue() }
    }

    private func flushDue() {
        // Swapped first: a flush may fail a write, close its channel and so make another
        // exchange write and hold a flush, which then goes into the fresh list.
        swap(&due, &flushing)
        for writer in flushing { writer.flushNow() }
        flushing.removeAll(keepingCapacity: true)
    }
}
