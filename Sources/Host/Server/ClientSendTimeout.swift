// Closes a client connection whose client has taken nothing of its answer for the send timeout (nginx's send_timeout).
internal import Logging
internal import NIOCore

/// Watches a client connection's writability, for the handler that owns it (HTTP1SemanticsHandler,
/// which every connection has, so no handler is added to the pipeline for this): NIO marks the
/// connection unwritable once more of the answer waits to be sent than its high watermark, the
/// socket's own buffer being full. If it stays so for `timeout`, the client has taken nothing
/// for that long, and the connection is closed, ending the answer (a stream's upstream call ends
/// with it). A client that reads, however slowly, makes it writable again and restarts the clock.
///
/// Without it, a client that asked for a stream on the router path and then stopped reading
/// held its connection open for good, with a socket buffer's worth of answer (megabytes) in the
/// kernel and the route's task parked in its write: back-pressure had stopped the upstream, and
/// `server.idle_timeout` counts only connections between requests. The chat pass-through ends
/// its own streams first (a 408 event, a second sooner), so this is the router path's bound and
/// every path's backstop.
struct ClientSendTimeout {
    let timeout: TimeAmount
    private var timer: Scheduled<Void>?

    init(timeout: TimeAmount) {
        self.timeout = timeout
    }

    /// Called on every writability change of the connection.
    mutating func writabilityChanged(_ context: ChannelHandlerContext, logger: Logger) {
        if context.channel.isWritable {
            cancel()
        } else if timer == nil {
            let seconds = Double(timeout.nanoseconds) / 1e9
            timer = context.eventLoop.assumeIsolated().scheduleTask(in: timeout) {
                guard context.channel.isActive, !context.channel.isWritable else { return }
                logger.info(
                    "client took nothing of its answer for the send timeout; closing the connection",
                    metadata: ["timeout_s": .string(UpstreamFailure.seconds(seconds)), "client": .string(context.remoteAddress?.ipAddress ?? "unknown")])
                context.close(promise: nil)
            }
        }
    }

    /// The connection is writable again, or gone.
    mutating func cancel() {
        timer?.cancel()
        timer = nil
    }
}
