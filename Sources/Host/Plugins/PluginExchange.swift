// One request handed to a plugin and its answer: the host side of `gh_exchange`.
internal import Foundation
internal import Hummingbird
internal import Logging
internal import NIOCore
internal import NIOPosix
internal import Synchronization

/// What a plugin answered.
enum PluginReply: Sendable {
    case whole(status: UInt16, headers: [(String, String)], body: ByteBuffer)
    case stream(status: UInt16, headers: [(String, String)], body: PluginStreamBody)
    /// The plugin did not answer within its timeout.
    case timedOut
}

/// The state machine behind one `gh_exchange*`. The pointer a plugin holds is a token into
/// `ExchangeTable`, never this object's address, so a buggy plugin that completes twice or
/// writes after completion gets GH_ERR_STATE instead of a use-after-free.
final class PluginExchange: Sendable {
    private enum State {
        case pending(CheckedContinuation<PluginReply, Never>?)
        case streaming(AsyncThrowingStream<ByteBuffer, any Error>.Continuation)
        /// The host stopped listening (timeout or client gone); the plugin must still complete.
        case abandoned
        case completed
    }

    /// How far a streamed answer may run ahead of the client reading it. Past it, `respond_write`
    /// waits on a plugin's own thread (back-pressure, as a blocking socket write), and cuts the
    /// client off on a host thread, which must not wait: memory stays bounded whatever a plugin
    /// writes. One write larger than this is taken when nothing is waiting.
    static let maxBufferedStreamBytes = 16 << 20

    let instance: PluginInstance
    let requestID: String
    private let state = Mutex<State>(.pending(nil))
    private let flow = StreamFlow()
    nonisolated(unsafe) private(set) var token: UInt = 0

    init(instance: PluginInstance, requestID: String) {
        self.instance = instance
        self.requestID = requestID
    }

    /// Registers the exchange and returns the opaque pointer handed to the plugin.
    func register() -> OpaquePointer {
        token = ExchangeTable.shared.insert(self)
        return OpaquePointer(bitPattern: token)!
    }

    func waitForReply(_ continuation: CheckedContinuation<PluginReply, Never>) {
        state.withLock { state in
            if case .pending(nil) = state { state = .pending(continuation) } else { continuation.resume(returning: .timedOut) }
        }
    }

    func respond(status: UInt16, headers: [(String, String)], body: ByteBuffer) -> Bool {
        let continuation: CheckedContinuation<PluginReply, Never>?? = state.withLock { state in
            switch state {
            case .pending(let continuation):
                state = .completed
                return continuation
            case .abandoned:
                state = .completed
                return .some(nil)
            case .streaming, .completed:
                return nil
            }
        }
        guard let continuation else { return false }
        finishExchange()
        continuation?.resume(returning: .whole(status: status, headers: headers, body: body))
        return true
    }

    func start(status: UInt16, headers: [(String, String)]) -> Bool {
        let (stream, streamContinuation) = AsyncThrowingStream<ByteBuffer, any Error>.makeStream()
        let waiting: CheckedContinuation<PluginReply, Never>? = state.withLock { state in
            guard case .pending(let continuation?) = state else { return nil }
            state = .streaming(streamContinuation)
            return continuation
        }
        guard let waiting else { return false }
        flow.begin()
        streamContinuation.onTermination = { [weak self] reason in
            if case .cancelled = reason { self?.abandonStream() }
            self?.flow.close()  // a writer waiting for room wakes, and fails
        }
        waiting.resume(returning: .stream(status: status, headers: headers, body: PluginStreamBody(chunks: stream, exchange: self)))
        return true
    }

    func write(_ chunk: ByteBuffer) -> Bool {
        let continuation: AsyncThrowingStream<ByteBuffer, any Error>.Continuation? = state.withLock { state in
            if case .streaming(let continuation) = state { return continuation }
            return nil
        }
        guard let continuation else { return false }
        switch flow.admit(chunk.readableBytes, limit: Self.maxBufferedStreamBytes, stallTimeout: instance.timeout, mayWait: Self.mayWaitOnThisThread) {
        case .admitted:
            break
        case .closed:
            return false
        case .stalled:
            cutOffSlowClient(reason: "the client took nothing for \(UpstreamFailure.seconds(instance.timeout))")
            return false
        case .mustNotWait:
            cutOffSlowClient(reason: "written more than 16 MiB ahead of the client from a host thread, which cannot wait")
            return false
        }
        if case .terminated = continuation.yield(chunk) { return false }
        return true
    }

    /// Whether `respond_write` may block the calling thread: not an event loop's, nor one
    /// running a Swift task (the host calls `handle`, middleware functions and LLM callbacks
    /// there, and the response writer needs them to make room).
    private static var mayWaitOnThisThread: Bool {
        MultiThreadedEventLoopGroup.currentEventLoop == nil && withUnsafeCurrentTask { $0 == nil }
    }

    /// The response writer took `bytes` of the stream.
    fileprivate func taken(_ bytes: Int) {
        flow.taken(bytes)
    }

    /// Ends the answer with an error, so the connection is closed without the body's proper end
    /// (the client can tell it is cut short), and leaves the exchange for the plugin to finish.
    private func cutOffSlowClient(reason: String) {
        let continuation: AsyncThrowingStream<ByteBuffer, any Error>.Continuation? = state.withLock { state in
            guard case .streaming(let continuation) = state else { return nil }
            state = .abandoned
            return continuation
        }
        guard let continuation else { return }
        flow.close()
        instance.logger.warning(
            "client too slow for the plugin's streamed answer; connection closed",
            metadata: ["request_id": .string(requestID), "reason": .string(reason)])
        continuation.finish(throwing: PluginStreamCutOff())
    }

    func finish() -> Bool {
        guard let continuation = completeStarted() else { return false }
        continuation?.finish()
        finishExchange()
        return true
    }

    /// Marks a started answer (streaming, or cut off already) complete and closes its flow;
    /// returns its stream's continuation (nil inside when cut off), or nil when the answer had
    /// not started or was complete already.
    private func completeStarted() -> AsyncThrowingStream<ByteBuffer, any Error>.Continuation?? {
        let result: AsyncThrowingStream<ByteBuffer, any Error>.Continuation?? = state.withLock { state in
            switch state {
            case .streaming(let continuation):
                state = .completed
                return .some(continuation)
            case .abandoned:
                state = .completed
                return .some(nil)
            case .pending, .completed:
                return nil
            }
        }
        if result != nil { flow.close() }
        return result
    }

    /// Ends a started answer as failed (`respond_abort`): the stream ends with an error, so the
    /// connection closes without the body's proper end, and the exchange is complete. False
    /// before the answer started or once the exchange is complete.
    func abort(reason: String) -> Bool {
        guard let continuation = completeStarted() else { return false }
        instance.stats.streamAborted()
        instance.logger.warning(
            "plugin ended its streamed answer as failed; connection closed",
            metadata: ["request_id": .string(requestID), "reason": .string(reason)])
        continuation?.finish(throwing: PluginStreamAborted(reason: reason))
        finishExchange()
        return true
    }

    /// The plugin's time to answer ran out. Only a wait for the answer's head is given up: once
    /// `respond_start` has won the race with the timer, the stream is the plugin's to finish.
    func timeOut() {
        let continuation: CheckedContinuation<PluginReply, Never>? = state.withLock { state in
            guard case .pending(let continuation) = state else { return nil }
            state = .abandoned
            return continuation
        }
        continuation?.resume(returning: .timedOut)
    }

    /// The host stops listening (the request was cancelled: the shutdown's time ran out). A
    /// stream already started ends with an error, so its connection closes without the body's
    /// proper end. The plugin's later completion is still accepted.
    func abandon() {
        let continuation: CheckedContinuation<PluginReply, Never>? = state.withLock { state in
            switch state {
            case .pending(let continuation):
                state = .abandoned
                return continuation
            case .streaming(let stream):
                stream.finish(throwing: CancellationError())  // its termination closes the flow
                state = .abandoned
                return nil
            case .abandoned, .completed:
                return nil
            }
        }
        continuation?.resume(returning: .timedOut)
    }

    private func abandonStream() {
        state.withLock { state in
            if case .streaming = state { state = .abandoned }
        }
    }

    private func finishExchange() {
        ExchangeTable.shared.remove(token)
        instance.requestFinished()
    }
}

/// The bytes between a plugin's `respond_write` and the response writer: counted, and waited
/// on by writers that may wait. (NSCondition: writers block plugin threads, not tasks.)
final class StreamFlow: @unchecked Sendable {
    enum Admission {
        case admitted
        /// The answer has ended (client gone, cut off, finished): nothing more is taken.
        case closed
        /// Still no room after the client took nothing for the stall timeout.
        case stalled
        /// No room, on a thread that must not wait.
        case mustNotWait
    }

    private let condition = NSCondition()
    private var buffered = 0
    private var lastTaken = ContinuousClock.now
    private var isClosed = false

    /// Counts `bytes` in once they fit under `limit` (or nothing else waits), waiting for room
    /// when `mayWait`, for as long as the client keeps taking some within `stallTimeout` seconds.
    func admit(_ bytes: Int, limit: Int, stallTimeout: Double, mayWait: Bool) -> Admission {
        condition.lock()
        defer { condition.unlock() }
        while !isClosed, buffered > 0, buffered + bytes > limit {
            guard mayWait else { return .mustNotWait }
            let left = (lastTaken + .seconds(stallTimeout) - .now).inSeconds
            guard left > 0 else { return .stalled }
            _ = condition.wait(until: Date(timeIntervalSinceNow: left))
        }
        guard !isClosed else { return .closed }
        buffered += bytes
        return .admitted
    }

    /// The answer's head went out: the client's stall is timed from now, not from the request.
    func begin() {
        condition.lock()
        lastTaken = .now
        condition.unlock()
    }

    func taken(_ bytes: Int) {
        condition.lock()
        buffered -= bytes
        lastTaken = .now
        condition.broadcast()
        condition.unlock()
    }

    func close() {
        condition.lock()
        isClosed = true
        condition.broadcast()
        condition.unlock()
    }
}

/// A plugin's streamed body as the response writer reads it: each chunk taken is counted off
/// the exchange's buffered bytes.
struct PluginStreamBody: AsyncSequence, Sendable {
    typealias Element = ByteBuffer
    let chunks: AsyncThrowingStream<ByteBuffer, any Error>
    let exchange: PluginExchange

    struct AsyncIterator: AsyncIteratorProtocol {
        var chunks: AsyncThrowingStream<ByteBuffer, any Error>.AsyncIterator
        let exchange: PluginExchange

        mutating func next() async throws -> ByteBuffer? {
            guard let chunk = try await chunks.next() else { return nil }
            exchange.taken(chunk.readableBytes)
            return chunk
        }
    }

    func makeAsyncIterator() -> AsyncIterator { AsyncIterator(chunks: chunks.makeAsyncIterator(), exchange: exchange) }
}

/// Ends a plugin's streamed answer whose client could not keep up: it took nothing for the
/// plugin's timeout, or fell more than `maxBufferedStreamBytes` behind a writer that cannot wait.
struct PluginStreamCutOff: Error, CustomStringConvertible {
    var description: String { "client too slow for the plugin's streamed answer" }
}

/// Ends a plugin's streamed answer that the plugin itself ended as failed (`respond_abort`).
struct PluginStreamAborted: Error, CustomStringConvertible {
    let reason: String
    var description: String { "the plugin ended its streamed answer as failed: \(reason)" }
}

/// Live exchanges by token (`PluginHandleToken`), which is what plugins hold.
final class ExchangeTable: Sendable {
    static let shared = ExchangeTable()

    private let table = Mutex<[UInt: PluginExchange]>([:])

    func insert(_ exchange: PluginExchange) -> UInt {
        table.withLock { live in
            let token = PluginHandleToken.make { live[$0] != nil }
            live[token] = exchange
            return token
        }
    }

    func lookup(_ pointer: OpaquePointer?) -> PluginExchange? {
        guard let pointer else { return nil }
        let token = UInt(bitPattern: pointer)
        return table.withLock { $0[token] }
    }

    func remove(_ token: UInt) {
        _ = table.withLock { $0.removeValue(forKey: token) }
    }
}
