// Keep-alive HTTP/1.1 connections to the upstream, one pool per event loop, used by the chat pass-through.
internal import Foundation
internal import NIOCore
internal import NIOHTTP1
internal import NIOPosix

/// Where the pass-through sends chat requests: a plain-HTTP upstream parsed from `upstream.url`.
struct UpstreamTarget: Sendable, Equatable {
    let host: String
    let port: Int
    /// The URL's path (without a trailing slash), put before `/v1/chat/completions`.
    let pathPrefix: String
    /// The `Host` header value.
    let authority: String
    /// The URL as configured (without a trailing slash), for error messages.
    let baseURL: String

    /// The target of an `http://` URL; nil for anything else (https goes through AsyncHTTPClient).
    init?(url: String) {
        guard let components = URLComponents(string: url), components.scheme?.lowercased() == "http",
            let rawHost = components.host, !rawHost.isEmpty, components.query == nil, components.user == nil
        else { return nil }
        // IPv6 literals: connect to the bare address, bracket it in the Host header.
        let host = rawHost.hasPrefix("[") && rawHost.hasSuffix("]") ? String(rawHost.dropFirst().dropLast()) : rawHost
        self.host = host
        port = components.port ?? 80
        pathPrefix = components.path.hasSuffix("/") ? String(components.path.dropLast()) : components.path
        let bracketed = host.contains(":") ? "[\(host)]" : host
        authority = components.port == nil ? bracketed : "\(bracketed):\(port)"
        baseURL = url.hasSuffix("/") ? String(url.dropLast()) : url
    }
}

/// What an upstream connection reports to the exchange using it. All calls arrive on the
/// connection's event loop.
protocol UpstreamResponseDelegate: AnyObject {
    func upstreamHead(_ head: HTTPResponseHead)
    func upstreamBody(_ buffer: ByteBuffer)
    func upstreamEnd()
    /// The connection failed or closed before the response ended.
    func upstreamFailed(_ failure: UpstreamFailure)
}

/// The idle keep-alive connections of one event loop. Connections are only ever used on the
/// loop that owns them, so a request never changes threads between client and upstream.
/// Not thread-safe: every call must be made on `eventLoop`.
final class UpstreamConnectionPool {
    let eventLoop: any EventLoop
    let target: UpstreamTarget
    let connectTimeout: TimeAmount
    /// Flushes the loop's upstream requests at the end of its round.
    let flusher: RoundFlusher
    /// Idle connections kept at most (nginx's `keepalive` in the benchmark is 128).
    let maxIdle = 128
    /// An idle connection older than this is closed instead of reused (AsyncHTTPClient's default).
    let idleLifetime = TimeAmount.seconds(60)
    private var idle: [UpstreamConnection] = []

    init(eventLoop: any EventLoop, target: UpstreamTarget, connectTimeout: TimeAmount, flusher: RoundFlusher) {
        self.eventLoop = eventLoop
        self.target = target
        self.connectTimeout = connectTimeout
        self.flusher = flusher
    }

    /// A new connection (when `takeIdle` has none, and for the one retry after a reused
    /// connection turned out to be closed).
    func connect(_ completion: @escaping (Result<UpstreamConnection, UpstreamFailure>) -> Void) {
        let target = target
        ClientBootstrap(group: eventLoop)
            .connectTimeout(connectTimeout)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    // Requests go out as bytes ChatExchange has serialized (PreEncodedRequestWriter);
                    // responses are parsed by NIO's decoder, which the connection handler keeps
                    // to tell it of each request.
                    let pipeline = channel.pipeline.syncOperations
                    let decoder = HTTPResponseDecoder(leftOverBytesStrategy: .dropBytes)
                    try pipeline.addHandler(PreEncodedRequestWriter())
                    try pipeline.addHandler(ByteToMessageHandler(decoder))
                    try pipeline.addHandler(UpstreamConnectionHandler(responseDecoder: decoder))
                }
            }
            .connect(host: target.host, port: target.port)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    do {
                        let handler = try channel.pipeline.syncOperations.handler(type: UpstreamConnectionHandler.self)
                        let connection = UpstreamConnection(channel: channel, handler: handler, flusher: self.flusher)
                        // No weak references (they give objects side tables, which slow every
                        // retain and release): the pool lives as long as its loop's state, and the
                        // closed connection is found by its handler.
                        handler.onIdleClose = { [self] closed in forget(closed) }
                        completion(.success(connection))
                    } catch {
                        channel.close(promise: nil)
                        completion(.failure(UpstreamFailure(error)))
                    }
                case .failure(let error):
                    completion(.failure(UpstreamFailure(error)))
                }
            }
    }

    /// The most recently released idle connection that is still usable, if any: the usual
    /// keep-alive case, taken at once (no completion, as `connect` needs).
    func takeIdle() -> UpstreamConnection? {
        guard !idle.isEmpty else { return nil }
        let now = NIODeadline.now()
        while let connection = idle.popLast() {
            if connection.channel.isActive, now - connection.idleSince < idleLifetime {
                connection.reused = true
                return connection
            }
            connection.close()
        }
        return nil
    }

    /// Takes back a connection whose response ended with keep-alive.
    func release(_ connection: UpstreamConnection) {
        guard connection.channel.isActive, idle.count < maxIdle else {
            connection.close()
            return
        }
        connection.handler.delegate = nil
        connection.idleSince = .now()
        idle.append(connection)
    }

    /// Drops the connection of a handler whose channel the upstream closed while it sat idle.
    private func forget(_ handler: UpstreamConnectionHandler) {
        idle.removeAll { $0.handler === handler }
    }
}

/// One upstream connection: its channel and the handler that reports its responses.
final class UpstreamConnection {
    let channel: any Channel
    let handler: UpstreamConnectionHandler
    /// Taken from the idle list (so a failure before any answer may be a stale keep-alive).
    var reused = false
    var idleSince = NIODeadline.now()

    /// Flushes this loop's upstream requests at the end of its round.
    private let flusher: RoundFlusher

    init(channel: any Channel, handler: UpstreamConnectionHandler, flusher: RoundFlusher) {
        self.channel = channel
        self.handler = handler
        self.flusher = flusher
    }

    /// Sends one request, already serialized (its head, with or followed by its body); the
    /// answer goes to `delegate`.
    func send(_ request: ByteBuffer, then body: ByteBuffer? = nil, to delegate: any UpstreamResponseDelegate) {
        handler.delegate = delegate
        handler.send(request, then: body, flushingWith: flusher)
    }

    func close() {
        handler.delegate = nil
        channel.close(promise: nil)
    }
}

/// The last handler of an upstream connection's pipeline: writes the request, hands the
/// response parts to the delegate, and holds reads while the client cannot take more bytes
/// (back-pressure from the client to the upstream).
final class UpstreamConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundIn = HTTPClientRequestPart
    typealias OutboundOut = HTTPClientRequestPart

    /// The exchange using this connection. Strong (the exchange may have no other owner while
    /// it drains a reply); cleared when the response ends or the connection fails or is released.
    var delegate: (any UpstreamResponseDelegate)?
    /// Called (with this handler) when the connection closes while no exchange is using it.
    var onIdleClose: ((UpstreamConnectionHandler) -> Void)?
    private var context: ChannelHandlerContext?
    /// The socket end of the pipeline, where the request bytes are written (past the decoder).
    private var writer: PreEncodedRequestWriter?
    /// NIO's response decoder in this pipeline, told of every request (see `send`).
    private let responseDecoder: HTTPResponseDecoder
    private var readsHeld = false
    private var readPending = false

    init(responseDecoder: HTTPResponseDecoder) {
        self.responseDecoder = responseDecoder
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        writer = try? context.pipeline.syncOperations.handler(type: PreEncodedRequestWriter.self)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    /// Every request the pass-through sends is a POST: the head NIO's response decoder is told
    /// of, so that it pairs each response with a request whose response has a body.
    private static let observedHead = HTTPRequestHead(version: .http1_1, method: .POST, uri: ChatPassThrough.path)

    func send(_ request: ByteBuffer, then body: ByteBuffer?, flushingWith flusher: RoundFlusher) {
        guard let context, let writer, context.channel.isActive else {
            let delegate = delegate
            self.delegate = nil
            delegate?.upstreamFailed(.closed)
            return
        }
        // The decoder is told of the request directly, as its handler would be by a write passing
        // through it (which would box the head and unbox it twice per request); the bytes go in
        // below it.
        responseDecoder.write(data: .head(Self.observedHead))
        writer.write(request, then: body)
        flusher.flushAtEndOfRound(writer)
    }

    /// Stops (or resumes) reading from the upstream.
    func holdReads(_ hold: Bool) {
        readsHeld = hold
        if !hold, readPending, let context {
            readPending = false
            context.read()
        }
    }

    func read(context: ChannelHandlerContext) {
        if readsHeld {
            readPending = true
        } else {
            context.read()
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): delegate?.upstreamHead(head)
        case .body(let buffer): delegate?.upstreamBody(buffer)
        case .end:
            let delegate = delegate
            self.delegate = nil
            delegate?.upstreamEnd()
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let delegate {
            self.delegate = nil
            delegate.upstreamFailed(.closed)
        } else {
            onIdleClose?(self)
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        let delegate = delegate
        self.delegate = nil
        delegate?.upstreamFailed(UpstreamFailure(error))
        context.close(promise: nil)
    }
}

/// The socket end of an upstream connection's pipeline, in place of NIO's request encoder: the
/// pass-through serializes its requests itself (a fixed head and the body, one buffer), which
/// spares building `HTTPHeaders` and encoding and validating them again for every request. NIO's
/// response decoder sits between this and the connection handler and must still know each
/// request's method to know how its response is framed; the connection handler tells it
/// directly. The request's bytes are written here directly (`write(_:then:)`), or arrive as body
/// parts, and go out unchanged; a head or end written through the pipeline stops here.
final class PreEncodedRequestWriter: ChannelOutboundHandler, RemovableChannelHandler, RoundFlushable {
    typealias OutboundIn = HTTPClientRequestPart
    typealias OutboundOut = IOData

    private var context: ChannelHandlerContext?

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    /// Writes a serialized request (then `more`), unflushed.
    func write(_ bytes: ByteBuffer, then more: ByteBuffer?) {
        context?.writeSerialized(bytes, then: more)
    }

    func flushNow() {
        context?.flush()
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .body(let bytes): context.write(wrapOutboundOut(bytes), promise: promise)
        case .head, .end: promise?.succeed()
        }
    }
}
