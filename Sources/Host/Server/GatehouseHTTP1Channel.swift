// The HTTP/1.1 child channel: Hummingbird's HTTP1Channel pipeline with the chat pass-through placed before the HTTPTypes codec.
internal import HTTPTypes
internal import HummingbirdCore
internal import Logging
internal import NIOCore
internal import NIOHTTP1
internal import NIOHTTPTypes
internal import NIOHTTPTypesHTTP1

/// Hummingbird's `HTTP1Channel`, assembled the same way (HTTP/1 codec, HTTPTypes codec,
/// connection state, async channel for the router), with the chat pass-through between the
/// HTTP/1 decoder and the HTTPTypes codec: requests it serves are never converted to HTTPTypes
/// and back, and it sees the request's HTTP version. Other requests pass through it untouched.
/// Its answers are written as bytes through `RawResponseWriter`, at the socket end.
struct GatehouseHTTP1Channel: ServerChildChannel, HTTPChannelHandler {
    typealias Value = NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>

    let responder: HTTPChannelHandler.Responder
    let passThrough: ChatPassThrough?
    /// How long a connection may sit idle before it is closed (nil: never).
    let idleTimeout: Duration?
    /// The request body limit: a request declaring a longer body is not invited to send it.
    let maxBodyBytes: Int
    /// Where requests the HTTP parser rejects are counted.
    let metrics: GatehouseMetrics?
    /// How long a client may take nothing of its answer before its connection is closed
    /// (`ClientSendTimeout`).
    let sendTimeout: TimeAmount

    /// The longest request head, and header field, accepted (Hummingbird's limits); longer gets 431.
    static let maxHeaderBytes = 80 * 1024

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        channel.eventLoop.makeCompletedFuture {
            // HTTP1Channel's default decoder limits.
            var limits = NIOHTTPDecoderLimitConfiguration()
            limits.maxHeaderFieldSize = Self.maxHeaderBytes
            limits.maxHeaderListSize = Self.maxHeaderBytes
            limits.maxHeaderFieldCount = 1000
            let pipeline = channel.pipeline.syncOperations
            if let passThrough {
                // The pass-through writes its own responses below the encoder (RawResponseWriter),
                // so the decoder is not paired with the encoder (the pairing would queue a method
                // for every request and pop one only per encoded response); the pass-through
                // handler keeps HEAD responses bodiless for the router instead.
                try pipeline.addHandler(RawResponseWriter())
                try pipeline.addHandler(HTTPResponseEncoder(configuration: .init()))
                try pipeline.addHandler(ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes, limitConfiguration: limits)))
                try pipeline.addHandler(passThrough.makeHandler(idleTimeout: idleTimeout.map(TimeAmount.init)))
            } else {
                try pipeline.configureHTTPServerPipeline(
                    withPipeliningAssistance: false, withErrorHandling: false, withOutboundHeaderValidation: false,
                    withEncoderConfiguration: .init(), withDecoderLimitConfiguration: limits)
            }
            // For the router's requests (all of them without the pass-through, which keeps
            // versions and keep-alive and answers `Expect` for its own); and every connection's
            // send timeout (the pass-through passes writability changes on).
            try pipeline.addHandler(
                HTTP1SemanticsHandler(
                    maxBodyBytes: maxBodyBytes, logger: logger, metrics: metrics, headsChecked: passThrough != nil, sendTimeout: sendTimeout))
            try pipeline.addHandler(HTTP1ToHTTPServerCodec(secure: false))
            // With the pass-through, this handler sees only the router's requests, so the
            // pass-through handler, which sees them all, keeps the idle timeout instead.
            try pipeline.addHandler(HTTPConnectionStateHandler(idleTimeout: passThrough == nil ? idleTimeout : nil, logger: logger))
            return try NIOAsyncChannel(wrappingChannelSynchronously: channel, configuration: .init(isOutboundHalfClosureEnabled: true))
        }
    }

    func handle(value: Value, logger: Logger) async {
        await handleHTTP(asyncChannel: value, logger: logger)
    }
}
