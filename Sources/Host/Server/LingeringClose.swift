// Closing a connection whose client may still be sending a refused request, without resetting it.
internal import NIOCore
internal import NIOHTTP1

/// The close of a connection whose client may still be sending the request just answered
/// (refused before its body was read, cut off by a parser error in its body, or a head the
/// parser rejected before its end). Closed at once with those bytes unread, the kernel resets
/// the connection, and a reset can destroy the answer before the client has read it (RFC 9112 section 9.6; nginx's `lingering_close`). So
/// the sending side closes after the answer, the handler drops whatever still comes, and the
/// connection closes when the client closes its side, or after `lingerTime`.
///
/// A class, used on its channel's event loop only: starting it closes, and a close can call
/// back into the handler (`channelInactive`), which must be able to cancel it meanwhile.
final class LingeringClose {
    /// The longest a connection lingers after its answer.
    static let lingerTime = TimeAmount.seconds(5)

    /// Started: the handler drops what the client still sends, and answers nothing more.
    private(set) var isLingering = false
    private var deadline: Scheduled<Void>?

    /// Closes the sending side once the answer written so far has gone, and the whole connection
    /// after `lingerTime`; at once when the client has closed its side already (`clientDoneSending`)
    /// or the channel cannot half-close.
    func start(_ context: ChannelHandlerContext, clientDoneSending: Bool) {
        guard !isLingering else { return }
        isLingering = true
        context.flush()
        guard !clientDoneSending else { return context.close(promise: nil) }
        let halfClosed = context.eventLoop.makePromise(of: Void.self)
        halfClosed.futureResult.assumeIsolatedUnsafeUnchecked().whenFailure { _ in context.close(promise: nil) }
        context.close(mode: .output, promise: halfClosed)
        guard context.channel.isActive else { return }  // the close went all the way
        context.read()
        deadline = context.eventLoop.assumeIsolatedUnsafeUnchecked().scheduleTask(in: Self.lingerTime) {
            context.close(promise: nil)
        }
    }

    /// Whether `error` is the decoder reporting on input a close left unread (the rest of a
    /// refused body, what follows a parser error or a refused head): no request, and nobody
    /// left to answer.
    static func isAboutUnreadInput(_ error: any Error) -> Bool {
        MalformedRequest(error) != nil || error is ByteToMessageDecoderError
    }

    /// Asks for the next read while lingering. The handlers past the one lingering (the router's
    /// async channel) have stopped asking, and unread input would stall the client's sending
    /// until the deadline, and its reset.
    func readMore(_ context: ChannelHandlerContext) {
        if isLingering { context.read() }
    }

    /// The client has closed its side while lingering: the connection closes now.
    func clientClosed(_ context: ChannelHandlerContext) {
        guard isLingering else { return }
        cancel()
        context.close(promise: nil)
    }

    /// The connection has closed (or the handler left it): no deadline is needed any more.
    func cancel() {
        deadline?.cancel()
        deadline = nil
    }
}
