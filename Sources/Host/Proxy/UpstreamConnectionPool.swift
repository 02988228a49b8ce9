// Keep-alive HTTP/1.1 connections to the upstream, one pool per event loop, used by the chat pass-through.
internal import Foundation
internal import NIOCore
internal import NIOPosix

/// Where the pass-through sends chat requests: a plain-HTTP upstream parsed from `upstream.url`.
struct UpstreamTarget: Sendable, Equatable {
    let host: String
    let port: Int
    /// The URL's path (without a trailing slash), put before the chat route's.
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
        // As written (percent-encoded): the decoded path would put a space, or a line break,
        // into the request line.
        let path = components.percentEncodedPath
        pathPrefix = path.hasSuffix("/") ? String(path.dropLast()) : path
        let bracketed = host.contains(":") ? "[\(host)]" : host
        authority = components.port == nil ? bracketed : "\(bracketed):\(port)"
        baseURL = url.hasSuffix("/") ? String(url.dropLast()) : url
    }
}

/// What an upstream connection reports to the exchange using it. All calls arrive on the
/// connection's event loop.
protocol UpstreamResponseDelegate: AnyObject {
    func upstreamHead(_ head: UpstreamReplyHead)
    func upstreamBody(_ buffer: ByteBuffer)
    /// The response has ended; `keepAlive`: the connection may carry another request.
    func upstreamEnd(keepAlive: Bool)
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
    /// An idle connection older than this is closed (AsyncHTTPClient's default): when taken,
    /// and by a sweep, so that the connections below the most recently used ones (the list is a
    /// stack) do not stay open forever after a burst.
    let idleLifetime: TimeAmount
    /// Oldest first, so the most recently released is taken first and the oldest expire first.
    private var idle: [UpstreamConnection] = []
    private var expirySweepScheduled = false

    init(eventLoop: any EventLoop, target: UpstreamTarget, connectTimeout: TimeAmount, flusher: RoundFlusher, idleLifetime: TimeAmount = .seconds(60)) {
        self.idleLifetime = idleLifetime
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
                // Requests go out as the bytes ChatExchange serialized; responses are parsed here.
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(UpstreamConnectionHandler()) }
            }
            .connect(host: target.host, port: target.port)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    do {
                        let handler = try channel.pipeline.syncOperations.handler(type: UpstreamConnectionHandler.self)
                        completion(.success(self.adopt(channel, handler: handler)))
                    } catch {
                        channel.close(promise: nil)
                        completion(.failure(UpstreamFailure(error)))
                    }
                case .failure(let error):
                    completion(.failure(UpstreamFailure(error)))
                }
            }
    }

    /// A connection of this pool over `channel`, forgotten if the upstream closes it while idle.
    func adopt(_ channel: any Channel, handler: UpstreamConnectionHandler) -> UpstreamConnection {
        // No weak references (they give objects side tables, which slow every retain and
        // release): the pool lives as long as its loop's state, and the closed connection is
        // found by its handler.
        handler.onIdleClose = { [self] closed in forget(closed) }
        return UpstreamConnection(channel: channel, handler: handler, flusher: flusher)
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
        scheduleExpirySweep()
    }

    /// Idle connections: how many there are (for tests).
    var idleCount: Int { idle.count }

    /// Closes, when the oldest idle connection reaches `idleLifetime`, those that have.
    private func scheduleExpirySweep() {
        guard !expirySweepScheduled, let oldest = idle.first else { return }
        expirySweepScheduled = true
        // Strong, as PassThroughLoop's sweep: the pool lives as long as its loop's state.
        eventLoop.assumeIsolated().scheduleTask(deadline: oldest.idleSince + idleLifetime) { self.expire() }
    }

    private func expire() {
        expirySweepScheduled = false
        let now = NIODeadline.now()
        let expired = idle.prefix { now - $0.idleSince >= idleLifetime }.count
        // Out of the list before they are closed: a close runs `forget` at once, which changing
        // the list under this loop would make remove the wrong connections (or trap).
        let closing = idle[..<expired]
        idle.removeFirst(expired)
        for connection in closing { connection.close() }
        scheduleExpirySweep()
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

/// The only handler of an upstream connection's pipeline: writes the serialized requests,
/// parses the responses (UpstreamResponseParser) and hands their parts to the delegate, and
/// holds reads while the client cannot take more bytes (back-pressure from the client to the
/// upstream).
///
/// Duplex, though it writes only through its own context: NIO asks outbound handlers alone
/// whether to read (`read(context:)`), so as an inbound handler it never held a read, and a
/// client that stopped reading a stream had the gateway buffer all of it.
final class UpstreamConnectionHandler: ChannelDuplexHandler, RoundFlushable {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = IOData
    typealias OutboundOut = IOData

    /// The exchange using this connection. Strong (the exchange may have no other owner while
    /// it drains a reply); cleared when the response ends or the connection fails or is released.
    var delegate: (any UpstreamResponseDelegate)?
    /// Called (with this handler) when the connection closes while no exchange is using it.
    var onIdleClose: ((UpstreamConnectionHandler) -> Void)?
    private var context: ChannelHandlerContext?
    private var parser = UpstreamResponseParser()
    /// The keep-alive verdict of the response being read.
    private var keepAlive = false
    /// Bytes of a head or chunk-size line that a read ended in the middle of.
    private var unparsed: ByteBuffer?
    private var readsHeld = false
    private var readPending = false
    /// Whether any byte has come since the last request was sent: after one, the request may
    /// have been acted on, so a failure is not retried.
    private(set) var heardSinceRequest = false

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    /// Writes one serialized request (then `body`), flushed at the end of the loop's round.
    func send(_ request: ByteBuffer, then body: ByteBuffer?, flushingWith flusher: RoundFlusher) {
        guard let context, context.channel.isActive else {
            let delegate = delegate
            self.delegate = nil
            delegate?.upstreamFailed(.closed)
            return
        }
        parser.expectResponse()
        heardSinceRequest = false
        context.writeSerialized(request, then: body)
        flusher.flushAtEndOfRound(self)
    }

    func flushNow() {
        context?.flush()
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
        heardSinceRequest = true
        var input = unwrapInboundIn(data)
        if var unparsed {
            self.unparsed = nil
            unparsed.writeBuffer(&input)
            input = unparsed
        }
        // The body bytes of one read go to the exchange together (a read may hold many chunks).
        var body: ByteBuffer?
        do {
            while let event = try parser.next(&input) {
                switch event {
                case .head(let head):
                    keepAlive = head.keepAlive
                    delegate?.upstreamHead(head)
                case .body(let bytes):
                    if body == nil {
                        body = bytes
                    } else {
                        body!.writeImmutableBuffer(bytes)
                    }
                case .end:
                    if let bytes = body {
                        body = nil
                        delegate?.upstreamBody(bytes)
                    }
                    // The hold was for this reply's client: an idle connection (pooled, or taken
                    // by the next exchange) must read, or its next reply, and its close, go unread.
                    holdReads(false)
                    // Bytes behind the end were not asked for: the connection is not used again.
                    let reusable = keepAlive && input.readableBytes == 0
                    let delegate = delegate
                    self.delegate = nil
                    delegate?.upstreamEnd(keepAlive: reusable)
                    if !reusable {
                        context.close(promise: nil)
                        return
                    }
                }
            }
        } catch {
            if let bytes = body { delegate?.upstreamBody(bytes) }
            fail(context: context, error)
            return
        }
        if let body { delegate?.upstreamBody(body) }
        if input.readableBytes > 0 { unparsed = input }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if parser.endsAtClose {
            // A body without a length ends with its connection.
            parser = UpstreamResponseParser()
            let delegate = delegate
            self.delegate = nil
            delegate?.upstreamEnd(keepAlive: false)
        } else if let delegate {
            self.delegate = nil
            delegate.upstreamFailed(.closed)
        } else {
            onIdleClose?(self)
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        fail(context: context, error)
    }

    private func fail(context: ChannelHandlerContext, _ error: any Error) {
        parser = UpstreamResponseParser()
        let delegate = delegate
        self.delegate = nil
        delegate?.upstreamFailed(UpstreamFailure(error))
        context.close(promise: nil)
    }
}
