// Closes a client connection whose client has taken nothing of its answer for the send timeout (nginx's send_timeout).
internal import Logging
internal import NIOCore

/// Watches a client connection's writability: NIO marks it unwritable once more of the answer
/// waits to be sent than its high watermark, the socket's own buffer being full. If it stays so
/// for `timeout`, the client has taken nothing for that long, and the connection is closed,
/// ending the answer (a stream's upstream call ends with it).
///
/// Without it, a client that asked for a stream on the router path and then stopped reading
/// held its connection open for good, with a socket buffer's worth of answer (megabytes) in the
/// kernel and the route's task parked in its write: back-pressure had stopped the upstream, and
/// `server.idle_timeout` counts only connections between requests. The chat pass-through ends
/// its own streams first (a 408 event, a moment sooner), so this is the router path's bound and
/// every path's backstop.
final class ClientSendTimeout: ChannelInboundHandler {
    typealias InboundIn = NIOAny

    private let timeout: TimeAmount
    private let logger: Logger
    private var timer: Scheduled<Void>?

    init(timeout: TimeAmount, logger: Logger) {
        self.timeout = timeout
        self.logger = logger
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            timer?.cancel()
            timer = nil
        } else if timer == nil {
            let seconds = Double(timeout.nanoseconds) / 1e9
            timer = context.eventLoop.assumeIsolated().scheduleTask(in: timeout) { [self] in
                timer = nil
                guard context.channel.isActive, !context.channel.isWritable else { return }
                logger.info(
                    "client took nothing of its answer for the send timeout; closing the connection",
                    metadata: ["timeout_s": .string(UpstreamFailure.seconds(seconds)), "client": .string(context.remoteAddress?.ipAddress ?? "unknown")])
                context.close(promise: nil)
            }
        }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        context.fireChannelInactive()
    }
}
