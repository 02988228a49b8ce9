// A plain-HTTP request sent to the TLS port gets a readable 400 naming the mistake, instead of a failed handshake.
internal import Logging
internal import NIOCore

/// Sits in front of TLS (`ReloadableTLSChannel` adds it): a request that is plain HTTP (it
/// starts with a method's letters, where a TLS client sends a handshake record, 0x16) is
/// answered in plain HTTP with an OpenAI-shaped 400 and closed, as nginx answers "The plain
/// HTTP request was sent to HTTPS port". Anything else goes to TLS untouched.
///
/// Looks at a connection's first read only, then leaves the pipeline; after a 400 it stays, to
/// drop what the client still sends while the connection closes, lingering (`LingeringClose`):
/// closed at once with a request body unread, the kernel reset the connection, and a client
/// still sending (a large POST) lost the 400 it had not read yet.
final class PlainHTTPDetector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    private let logger: Logger
    private let metrics: GatehouseMetrics?
    private let lingering = LingeringClose()

    init(logger: Logger, metrics: GatehouseMetrics?) {
        self.logger = logger
        self.metrics = metrics
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !lingering.isLingering else { return lingering.readMore(context) }  // the rest of the refused request, dropped
        let bytes = unwrapInboundIn(data)
        guard let first = bytes.getInteger(at: bytes.readerIndex, as: UInt8.self), (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(first) else {
            context.fireChannelRead(data)
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            return
        }
        let failure = OpenAIError(
            .badRequest, "this port speaks HTTPS: the request was sent as plain HTTP (use https://)", code: "plain_http_on_tls_port")
        let requestID = RequestIDGenerator.next()
        metrics?.recordUnparsed(status: failure.status.code)
        logger.info(
            "plain HTTP request on the TLS port",
            metadata: ["client": .string(context.channel.remoteAddress?.ipAddress ?? "unknown"), "request_id": .string(requestID)])
        context.write(wrapOutboundOut(failure.closingResponseBytes(requestID: requestID)), promise: nil)
        lingering.start(context, clientDoneSending: false)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if lingering.isLingering, case .inputClosed? = event as? ChannelEvent { return lingering.clientClosed(context) }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        lingering.cancel()
        context.fireChannelInactive()
    }
}
