// Caps the client connections open at once, and stops accepting for a moment when the process is out of file descriptors.
internal import Logging
internal import NIOCore
#if canImport(Glibc)
internal import Glibc
#endif

/// The first handler in the listening socket's pipeline: it sees each accepted connection
/// (`channelRead`), each request for more (`read`) and each failed `accept(2)` (`errorCaught`).
///
/// - **At the limit** it holds back the listening socket's reads, as nginx's `worker_connections`
///   does: new connections wait in the kernel's listen backlog and are accepted as others close,
///   rather than being refused. (NIO accepts up to four connections per wake-up, so a burst can
///   pass the limit by a few.)
/// - **Out of file descriptors** (`EMFILE`, `ENFILE`; also `ENOBUFS`, `ENOMEM`) it stops polling the
///   listening socket for `pauseAfterAcceptFailure`. NIO's own `AcceptBackoffHandler` never takes
///   effect here: a failed accept leaves the channel's read pending, so epoll reports the socket
///   readable again at once and the event loop spins on `accept` at 100% CPU for as long as the
///   descriptors are short. Turning `autoRead` off takes the socket out of epoll; turning it back
///   on re-registers it.
///
/// Runs on the listening socket's event loop only; connection closes hop there.
final class ClientConnectionGate: ChannelDuplexHandler {
    typealias InboundIn = Channel
    typealias InboundOut = Channel
    typealias OutboundIn = Never

    /// How long accepting stops after `accept(2)` failed for want of descriptors: short enough to
    /// pick up a freed descriptor soon, long enough that retries cost nothing (nginx waits 500 ms).
    static let pauseAfterAcceptFailure = TimeAmount.milliseconds(100)
    /// At most one warning per episode kind in this long, so a gateway stuck at a limit logs
    /// that it is, without a line per connection.
    static let warningInterval = TimeAmount.seconds(10)

    private let limit: Int?
    private let metrics: GatehouseMetrics
    private let logger: Logger
    private var open = 0
    /// A read the pipeline asked for while at the limit or paused; passed on when that ends.
    private var readHeldBack = false
    /// Set while accepting is paused after a failed accept (autoRead is off until it fires).
    private var pause: Scheduled<Void>?
    private var lastLimitWarning: NIODeadline?
    private var lastDescriptorWarning: NIODeadline?

    /// - Parameter limit: the most client connections open at once; nil for no limit.
    init(limit: Int?, metrics: GatehouseMetrics, logger: Logger) {
        self.limit = limit
        self.metrics = metrics
        self.logger = logger
    }

    private var atLimit: Bool { limit.map { open >= $0 } ?? false }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let connection = unwrapInboundIn(data)
        open += 1
        metrics.clientConnections.increment()
        if let limit, open == limit, Self.due(&lastLimitWarning) {
            logger.warning(
                "client connection limit reached: new connections wait in the listen backlog until others close",
                metadata: ["max_connections": .stringConvertible(limit)])
        }
        if atLimit { metrics.connectionLimitWaits.increment() }
        let gate = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        connection.closeFuture.hop(to: context.eventLoop).whenComplete { _ in
            let (gate, context) = gate.value
            gate.open -= 1
            gate.metrics.clientConnections.decrement()
            gate.resumeIfAllowed(context: context)
        }
        context.fireChannelRead(data)
    }

    func read(context: ChannelHandlerContext) {
        guard !atLimit, pause == nil else {
            readHeldBack = true
            return
        }
        context.read()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard let error = error as? IOError, Self.isShortOfResources(error) else {
            context.fireErrorCaught(error)
            return
        }
        // Not passed on: NIO's AcceptBackoffHandler further down would add its own 1 s delay to
        // the next read, and this pause is the one policy.
        metrics.acceptPauses.increment()
        if Self.due(&lastDescriptorWarning) {
            logger.warning(
                "cannot accept connections: out of file descriptors; retrying every 100 ms (raise the open-files limit, or lower server.max_connections)",
                metadata: ["error": .string("\(String(cString: strerror(error.errnoCode))) (errno \(error.errnoCode))")])
        }
        guard pause == nil else { return }
        try? context.channel.syncOptions?.setOption(ChannelOptions.autoRead, value: false)
        let gate = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        pause = context.eventLoop.scheduleTask(in: Self.pauseAfterAcceptFailure) {
            let (gate, context) = gate.value
            gate.pause = nil
            gate.readHeldBack = true
            gate.resumeIfAllowed(context: context)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        pause?.cancel()
        pause = nil
        context.fireChannelInactive()
    }

    /// Passes on a held-back read once neither the limit nor a pause stands in the way.
    private func resumeIfAllowed(context: ChannelHandlerContext) {
        guard readHeldBack, !atLimit, pause == nil, context.channel.isActive else { return }
        readHeldBack = false
        if let options = context.channel.syncOptions, (try? options.getOption(ChannelOptions.autoRead)) == false {
            // Turning autoRead back on is what registers the socket with epoll again.
            try? options.setOption(ChannelOptions.autoRead, value: true)
        } else {
            context.read()
        }
    }

    /// The accept failures that free descriptors or memory will cure, as opposed to ones about a
    /// single connection (like `ECONNABORTED`), which NIO already skips.
    static func isShortOfResources(_ error: IOError) -> Bool {
        let code = error.errnoCode
        return code == EMFILE || code == ENFILE || code == ENOBUFS || code == ENOMEM
    }

    /// True, and the time noted, when no warning of this kind went out within `warningInterval`.
    private static func due(_ last: inout NIODeadline?) -> Bool {
        let now = NIODeadline.now()
        if let last, now - last < warningInterval { return false }
        last = now
        return true
    }
}
