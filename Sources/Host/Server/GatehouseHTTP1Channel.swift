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
            try pipeline.configureHTTPServerPipeline(
                withPipeliningAssistance: false, withErrorHandling: false, withOutboundHeaderValidation: false,
                withEncoderConfiguration: .init(), withDecoderLimitConfiguration: limits)
            if let passThrough { try pipeline.addHandler(passThrough.makeHandler()) }
            try pipeline.addHandler(HTTP1ToHTTPServerCodec(secure: false))
            try pipeline.addHandler(HTTPConnectionStateHandler(idleTimeout: nil, logger: logger))
            return try NIOAsyncChannel(wrappingChannelSynchronously: channel, configuration: .init(isOutboundHalfClosureEnabled: true))
        }
    }

    func handle(value: Value, logger: Logger) async {
        await handleHTTP(asyncChannel: value, logger: logger)
    }
}
