// The HTTP/1.1 child channel: Hummingbird's HTTP1Channel pipeline with the chat pass-through placed before the HTTPTypes codec.
internal import HTTPTypes
public import HummingbirdCore
public import Logging
public import NIOCore
internal import NIOHTTP1
public import NIOHTTPTypes
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

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        channel.eventLoop.makeCompletedFuture {
            // HTTP1Channel's default decoder limits.
            var limits = NIOHTTPDecoderLimitConfiguration()
            limits.maxHeaderFieldSize = 80 * 1024
            limits.maxHeaderListSize = 80 * 1024
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
                try pipeline.addHandler(passThrough.makeHandler())
            } else {
                try pipeline.configureHTTPServerPipeline(
                    withPipeliningAssistance: false, withErrorHandling: false, withOutboundHeaderValidation: false,
                    withEncoderConfiguration: .init(), withDecoderLimitConfiguration: limits)
            }
            try pipeline.addHandler(HTTP1ToHTTPServerCodec(secure: false))
            try pipeline.addHandler(HTTPConnectionStateHandler(idleTimeout: nil, logger: logger))
            return try NIOAsyncChannel(wrappingChannelSynchronously: channel, configuration: .init(isOutboundHalfClosureEnabled: true))
        }
    }

    func handle(value: Value, logger: Logger) async {
        await handleHTTP(asyncChannel: value, logger: logger)
    }
}
