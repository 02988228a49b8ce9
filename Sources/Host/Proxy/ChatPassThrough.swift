// The chat pass-through: POST /v1/chat/completions to an OpenAI-compatible upstream, served
// inside the NIO pipeline on the connection's own event loop (no task, no thread hop).
internal import Logging
internal import NIOCore
internal import NIOHTTP1
internal import Synchronization

/// What every connection's pass-through handler shares: configuration, the gateway's rules
/// (API key, rate limit, cache, metrics, access log) and one upstream pool per event loop.
///
/// It serves exactly what the router's `/v1/chat/completions` serves for the `openai` backend,
/// through the same helpers, but without Hummingbird's and AsyncHTTPClient's per-request
/// async hand-offs, which cost most of the proxy overhead (docs/PERFORMANCE.md). Requests it
/// does not take — other routes, or any request while a plugin middleware applies to the
/// path — go on down the pipeline to the router unchanged.
final class ChatPassThrough: Sendable {
    static let path = "/v1/chat/completions"

    let target: UpstreamTarget
    /// The chat route's path at the upstream, after the target's own (`Upstream.openAIAPIPath`).
    let upstreamPath: String
    let timeout: Double
    let connectTimeout: TimeAmount
    /// The upstream request's request line and fixed header fields (with `Authorization` when
    /// the upstream needs a key), as bytes; ChatExchange adds the length and request id.
    let upstreamHeadPrefix: [UInt8]
    let maxBodyBytes: Int
    let apiKeys: APIKeyCheck
    let limiter: RateLimiter?
    let middleware: MiddlewareTable
    let cache: ResponseCache?
    let metrics: GatehouseMetrics?
    let backendName: String
    /// The upstream key, masked in the upstream's error messages.
    let secrets: SecretMask
    let logger: Logger
    /// The access log's handler, cast once here rather than per request (the cast showed in
    /// profiles); nil when the level hides access lines or another handler is installed.
    let accessLogHandler: JSONLogHandler?
    let serverName: String
    /// Who a request comes from behind trusted proxies (as the router's ClientAddressMiddleware).
    let clientAddresses: ClientAddressResolver
    /// The answers' CORS headers (as the router's `CORSMiddleware` adds them); nil when off.
    let cors: CORSPolicy?
    private let loops = Mutex<[ObjectIdentifier: NIOLoopBound<PassThroughLoop>]>([:])

    /// Nil unless the backend is `openai` over plain HTTP (https upstreams, and Ollama's
    /// translation, stay on the router path).
    init?(
        config: GatehouseConfig, chat: ChatService, limiter: RateLimiter?, middleware: MiddlewareTable, metrics: GatehouseMetrics?,
        clientAddresses: ClientAddressResolver, logger: Logger, serverName: String
    ) {
        guard config.upstream.backend == .openai, let target = UpstreamTarget(url: config.upstream.url) else { return nil }
        self.target = target
        upstreamPath = config.upstream.openAIAPIPath + "/chat/completions"
        timeout = config.upstream.timeout
        connectTimeout = .milliseconds(Int64(config.upstream.connectTimeout * 1000))
        let upstreamAuthorization = config.upstream.apiKey.map { "Bearer \($0)" }
        // The head is written as bytes (ChatExchange): a key that cannot be a header value
        // leaves chat to the router path, whose client rejects it with a clear error.
        guard upstreamAuthorization?.utf8.allSatisfy({ $0 >= 0x20 && $0 != 0x7f }) ?? true else { return nil }
        var prefix = "POST \(target.pathPrefix)\(upstreamPath) HTTP/1.1\r\nHost: \(target.authority)\r\n"
        prefix += "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        if let upstreamAuthorization { prefix += "Authorization: \(upstreamAuthorization)\r\n" }
        upstreamHeadPrefix = Array(prefix.utf8)
        maxBodyBytes = config.maxBodyBytes
        apiKeys = APIKeyCheck(apiKey: config.apiKey)
        self.limiter = limiter
        self.middleware = middleware
        cache = chat.cache
        self.metrics = metrics
        backendName = chat.backend.name
        secrets = SecretMask([config.upstream.apiKey])
        self.logger = logger
        accessLogHandler = logger.logLevel <= .info ? logger.handler as? JSONLogHandler : nil
        self.serverName = serverName
        self.clientAddresses = clientAddresses
        cors = CORSPolicy(origins: config.corsOrigins)
    }

    /// A handler for one new connection (added to every HTTP/1 channel's pipeline), which
    /// closes the connection once it has been idle for `idleTimeout` (nil: never).
    func makeHandler(idleTimeout: TimeAmount?) -> ChatPassThroughHandler {
        ChatPassThroughHandler(passThrough: self, idleTimeout: idleTimeout)
    }

    /// Whether this request is served here rather than by the router.
    func takes(_ head: HTTPRequestHead) -> Bool {
        guard head.method == .POST else { return false }
        // The path, with or without a query, compared as bytes (Character search is slow).
        let uri = head.uri.utf8
        let path = Self.path.utf8
        guard uri.starts(with: path), uri.count == path.count || uri[uri.index(uri.startIndex, offsetBy: path.count)] == UInt8(ascii: "?")
        else { return false }
        // Plugin middleware run only on the router path; while one applies, step aside.
        return middleware.isEmpty || !middleware.snapshot().contains { $0.applies(to: Self.path) }
    }

    /// The pass-through state of `loop` (once per connection). Must be called on `loop`.
    func state(for loop: any EventLoop) -> PassThroughLoop {
        let bound = loops.withLock { loops in
            if let existing = loops[ObjectIdentifier(loop)] { return existing }
            let pool = UpstreamConnectionPool(eventLoop: loop, target: target, connectTimeout: connectTimeout, flusher: RoundFlusher(eventLoop: loop))
            let created = NIOLoopBound(PassThroughLoop(pool: pool, metrics: metrics, backend: backendName), eventLoop: loop)
            loops[ObjectIdentifier(loop)] = created
            return created
        }
        return bound.value
    }
}

/// The pass-through's place in a connection's pipeline, right after HTTP/1 decoding and before
/// the router (see GatehouseHTTP1Channel). It takes the requests `ChatPassThrough.takes` accepts and hands everything else
/// on, keeping responses in request order when a client pipelines: a request arriving while
/// an earlier one is still being answered waits until that answer has ended.
///
/// As the one handler that sees every request and the end of every answer, it also closes
/// idle connections (the router's connection handler would see only the router's requests).
final class ChatPassThroughHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private enum Reader {
        case none, router, exchange
    }

    let passThrough: ChatPassThrough
    private var context: ChannelHandlerContext?
    private var loop: PassThroughLoop?
    private var remoteAddress = "unknown"
    /// Who gets the body of the request being read.
    private var reader = Reader.none
    /// The pass-through request being read or answered.
    private var exchange: ChatExchange?
    /// Requests handed to the router whose responses have not ended yet.
    private var routerResponsesPending = 0
    /// Parts that must wait for an earlier response to end. While any wait, reading stops
    /// (`read(context:)`): a client pipelining behind a long answer (a stream lasts up to an
    /// hour) would otherwise fill this as fast as it can send.
    private var queued = CircularBuffer<HTTPServerRequestPart>()
    /// A read asked for (by the handlers behind) while parts were queued, made once they are not.
    private var readHeld = false
    /// A graceful-shutdown request held back until the exchange in progress has ended.
    private var quiesceHeld = false
    /// The client's half-close, held back while requests it sent before it wait to begin: the
    /// router closes the connection when it hears of it. (During an exchange it ends the exchange.)
    private var inputClosedHeld = false
    /// Where the exchanges' serialized answers are written (the socket end of the pipeline).
    private var rawWriter: RawResponseWriter?
    /// The methods of router requests whose responses have not started, oldest first.
    private var routerMethods = CircularBuffer<HTTPMethod>()
    /// The router response being written answers a HEAD request: it has no body.
    private var suppressingBody = false
    /// The exchange in progress ends the connection when it has answered: its request was
    /// answered before its body was read (refused at once, or cut off by a parser error), or
    /// its client left. The close lingers (`LingeringClose`), as the client may still be
    /// sending; it is immediate when the client has closed its side.
    private var closeAfterExchange = false
    /// This handler has closed the connection (or its sending side, lingering). What the parser
    /// reports after that (the unread rest of a refused request's body, cut off by the close) is
    /// no request, and nobody is left to answer.
    private var closed = false
    /// The client has closed its sending side.
    private var clientDoneSending = false
    private let lingering = LingeringClose()
    /// What was rejected after requests whose answers were still to be written (the
    /// exchange's, or the router's): answered when they have been.
    private var rejectedAfterPending: MalformedRequest?
    /// Why a request head was refused here (`MalformedRequest(head:)`): what the parser
    /// delivers after it is unread input, as after a parser error.
    private var refusedHead: MalformedRequest?
    private let idleTimeout: TimeAmount?
    /// When the client last sent a request part, or was last sent the end of an answer.
    private var lastActivity = NIODeadline.now()
    /// The one pending idle check (re-armed as it fires, not per request).
    private var idleCheck: Scheduled<Void>?

    init(passThrough: ChatPassThrough, idleTimeout: TimeAmount?) {
        self.passThrough = passThrough
        self.idleTimeout = idleTimeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        loop = passThrough.state(for: context.eventLoop)
        remoteAddress = context.channel.remoteAddress?.ipAddress ?? "unknown"
        rawWriter = try? context.pipeline.syncOperations.handler(type: RawResponseWriter.self)
        if let idleTimeout { scheduleIdleCheck(context, at: lastActivity + idleTimeout) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        idleCheck?.cancel()
        idleCheck = nil
        lingering.cancel()
    }

    // MARK: Idle connections

    /// A request has been read whole and its answer has not ended (or one waits behind it):
    /// however long the upstream takes, the connection is not idle. A request still being read
    /// is not answering: a client that stops sending mid-request is idle.
    private var isAnswering: Bool {
        reader == .none && (exchange != nil || routerResponsesPending > 0 || !queued.isEmpty)
    }

    private func scheduleIdleCheck(_ context: ChannelHandlerContext, at deadline: NIODeadline) {
        idleCheck = context.eventLoop.assumeIsolatedUnsafeUnchecked().scheduleTask(deadline: deadline) { [self] in
            idleCheck = nil
            guard let context = self.context, let idleTimeout, context.channel.isActive else { return }
            let now = NIODeadline.now()
            if isAnswering {
                scheduleIdleCheck(context, at: now + idleTimeout)
            } else if now >= lastActivity + idleTimeout {
                context.close(promise: nil)
            } else {
                scheduleIdleCheck(context, at: lastActivity + idleTimeout)
            }
        }
    }

    /// Inside `channelRead`: the `channelReadComplete` that follows delivers what was forwarded.
    private var insideChannelRead = false
    /// Parts forwarded to the router since the last `channelReadComplete`.
    private var forwardedUnread = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closed else { return lingering.readMore(context) }  // lingering: the rest of a refused body, dropped
        // After a refused head, its body (and what follows) is as unreadable as after a parser error.
        if let refusedHead { return errorCaught(context: context, error: refusedHead) }
        let part = unwrapInboundIn(data)
        if case .head(let head) = part, let rejection = MalformedRequest(head: head) {
            refusedHead = rejection
            return errorCaught(context: context, error: rejection)
        }
        if idleTimeout != nil { lastActivity = .now() }
        insideChannelRead = true
        defer { insideChannelRead = false }
        // The usual case, nothing waiting: the part is handled without a trip through the queue.
        if queued.isEmpty, canProcess(part) {
            process(part, context)
        } else {
            queued.append(part)
            drain()
        }
    }

    /// Passed on only when this read gave the router something: the handlers behind (up to
    /// the router's async channel) have nothing to do for a read the pass-through consumed.
    func channelReadComplete(context: ChannelHandlerContext) {
        answerRefusalAwaitingItsBody()  // its end did not come in this read
        guard forwardedUnread else { return }
        forwardedUnread = false
        context.fireChannelReadComplete()
    }

    /// A request refused at its head whose end has not come is answered now, and the connection
    /// closes after it, rather than wait while the client sends (or never sends) the rest.
    private func answerRefusalAwaitingItsBody() {
        guard reader == .exchange, let exchange, exchange.awaitsEndOfRefusedBody else { return }
        closeAfterExchange = true
        exchange.answerHeldRefusal()
    }

    /// Processes queued parts in order while nothing earlier is still being answered.
    private func drain() {
        guard let context else { return }
        defer {
            // Parts released from the queue outside a read: the router's channel delivers
            // reads on readComplete, so send one.
            if forwardedUnread, !insideChannelRead {
                forwardedUnread = false
                context.fireChannelReadComplete()
            }
        }
        while let part = queued.first, canProcess(part) {
            // Off the queue before it is acted on: answering may end the exchange, which drains again.
            queued.removeFirst()
            process(part, context)
        }
        // Outside a read, no channelReadComplete follows to answer a request refused at its head.
        if !insideChannelRead { answerRefusalAwaitingItsBody() }
        if let rejected = rejectedAfterPending, exchange == nil, routerResponsesPending == 0, queued.isEmpty {
            rejectedAfterPending = nil
            return answerRejected(rejected, context)  // the last answer on this connection
        }
        if quiesceHeld, exchange == nil, queued.isEmpty {
            // Held for what was queued, which went to the router after all: it closes after it.
            quiesceHeld = false
            context.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        }
        if inputClosedHeld, exchange == nil, queued.isEmpty {
            inputClosedHeld = false
            context.flush()  // the last answer's flush would otherwise wait for the round's end
            context.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        }
        if readHeld, queued.isEmpty, !closed {
            readHeld = false
            context.read()
        }
    }

    /// Reads wait while parts are queued: what one read brings is bounded, the queue too.
    func read(context: ChannelHandlerContext) {
        if queued.isEmpty || closed {
            context.read()
        } else {
            readHeld = true
        }
    }

    /// Whether `part` can be handled now: a new request waits while an exchange is answering,
    /// and a pass-through request also while router responses are still being written.
    private func canProcess(_ part: HTTPServerRequestPart) -> Bool {
        if exchange != nil, reader != .exchange { return false }
        if routerResponsesPending > 0, case .head(let head) = part, passThrough.takes(head) { return false }
        return true
    }

    private func process(_ part: HTTPServerRequestPart, _ context: ChannelHandlerContext) {
        switch part {
        case .head(let head):
            if let loop, passThrough.takes(head) {
                reader = .exchange
                // A body the client holds back for a 100 but declares over the limit is refused
                // at once (413, or an earlier refusal), without it; then the connection closes, as
                // the parser would take what the client sends next for that body.
                let expectsContinue = head.expectsContinue
                let refuseNow = expectsContinue && head.declaresBody(longerThan: passThrough.maxBodyBytes)
                let client =
                    passThrough.clientAddresses.isEnabled
                    ? passThrough.clientAddresses.clientAddress(peer: remoteAddress, forwardedFor: head.headers["X-Forwarded-For"]) : remoteAddress
                let exchange = ChatExchange(head: head, handler: self, loop: loop, remoteAddress: client)
                self.exchange = exchange
                if refuseNow {
                    closeAfterExchange = true
                    exchange.requestEnded()
                } else if exchange.refuseBeforeBody() {
                    // Its end may be in this read (channelReadComplete answers if not); a client
                    // holding its body back for a 100 is answered now instead.
                    if expectsContinue {
                        closeAfterExchange = true
                        exchange.answerHeldRefusal()
                    }
                } else if expectsContinue, let rawWriter {
                    // Nothing else is being answered here (canProcess), so an interim answer is safe.
                    rawWriter.write(ByteBuffer(staticString: "HTTP/1.1 100 Continue\r\n\r\n"))
                    rawWriter.flushNow()
                }
            } else {
                reader = .router
                routerResponsesPending += 1
                routerMethods.append(head.method)
                forward(part, context)
            }
        case .body(let buffer):
            if reader == .exchange { exchange?.receive(buffer) } else { forward(part, context) }
        case .end:
            let wasExchange = reader == .exchange
            reader = .none
            if wasExchange { exchange?.requestEnded() } else { forward(part, context) }
        }
    }

    private func forward(_ part: HTTPServerRequestPart, _ context: ChannelHandlerContext) {
        forwardedUnread = true
        context.fireChannelRead(wrapInboundOut(part))
    }

    /// Router responses pass through; their ends are counted to keep pipelined order. The
    /// encoder is not paired with the decoder here (GatehouseHTTP1Channel), so what the pairing
    /// does is done here: a response to HEAD keeps its head (length and framing fields included)
    /// and loses its body, failed as NIO's encoder fails it. (NIO does the same for CONNECT;
    /// the router answers CONNECT only with errors, whose bodies HTTP allows.)
    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .head(let head):
            // A 1xx other than 101 is followed by the final head, which answers the request.
            let code = head.status.code
            if !(100..<200).contains(code) || code == 101 { suppressingBody = routerMethods.popFirst() == .HEAD }
            context.write(data, promise: promise)
        case .body:
            if suppressingBody {
                promise?.fail(NIOHTTPResponseEncoderError.responseBodyNotAllowed)
            } else {
                context.write(data, promise: promise)
            }
        case .end:
            if suppressingBody {
                // Nothing to end on the wire (the encoder would close a chunked body).
                suppressingBody = false
                promise?.succeed()
            } else {
                context.write(data, promise: promise)
            }
            routerResponsesPending -= 1
            if idleTimeout != nil { lastActivity = .now() }
            if routerResponsesPending == 0, !queued.isEmpty || rejectedAfterPending != nil { drain() }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // An answer written in this loop round is flushed only at its end (RoundFlusher); the
        // router may close the connection on this event (shutdown, the client's half-close),
        // and closing drops what was not flushed.
        context.flush()
        if case .inputClosed? = event as? ChannelEvent { clientDoneSending = true }
        if closed {
            // Lingering, and the client has sent all it will: done.
            if case .inputClosed? = event as? ChannelEvent { lingering.clientClosed(context) }
            return
        }
        // The router's connection handler closes idle connections on graceful shutdown; it
        // cannot see an exchange in progress, so it hears of the shutdown when that has ended.
        // Nor a chat request queued behind its own response: it would close the connection
        // after that, with the chat request read and never answered.
        if event is ChannelShouldQuiesceEvent, exchange != nil || !queued.isEmpty {
            quiesceHeld = true
            return
        }
        if case .inputClosed? = event as? ChannelEvent {
            // The client closed its side while its answer was being made: it has gone (an SDK's
            // timeout, a stopped generation), as nginx and Go's net/http take it, so the upstream
            // call is abandoned rather than run to its end for nobody (see ClientDeparture).
            if let exchange {
                queued.removeAll()
                if exchange.isStreaming {
                    // Mid-stream there is no answering: the stream just ends.
                    self.exchange = nil
                    exchange.clientClosed()
                    closed = true
                    context.close(promise: nil)
                } else {
                    closeAfterExchange = true
                    exchange.clientLeft()  // answers 499; the connection closes after it
                }
                return
            }
            // Requests read before it and not yet begun are answered first.
            if !queued.isEmpty {
                inputClosedHeld = true
                return
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// Hummingbird's connection handler closes the connection's input when it is cancelled,
    /// which happens only when the shutdown's `shutdown_timeout` has run out. An exchange still
    /// in progress then has its client told so, at once (503 `server_shutting_down`, or the
    /// stream's error event and `[DONE]`), and the connection closes. At once, rather than on
    /// the `inputClosed` that follows: over TLS that event never comes (NIOSSLHandler refuses
    /// to close only the input), and the client saw the connection drop.
    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        guard mode == .input, !closed, let exchange else { return context.close(mode: mode, promise: promise) }
        queued.removeAll()
        closeAfterExchange = true
        exchange.serverStopping()
        context.flush()
        lingering.cancel()
        closed = true
        context.close(mode: .all, promise: promise)
    }

    /// A request that cannot be read (NIO's parser rejected it, or its head's framing is faulty,
    /// `MalformedRequest`): the next one cannot be found, so the connection closes once the
    /// error is answered. In a body the router is reading, the router answers
    /// (its read fails); in the body of an exchange, the exchange answers; after requests still
    /// being answered or waiting whole in the queue, the error is answered when they have been
    /// (answering it first would pair it, for the client, with the request it had sent before).
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if closed, LingeringClose.isAboutUnreadInput(error) { return lingering.readMore(context) }
        guard let rejection = MalformedRequest(error), reader != .router else { return context.fireErrorCaught(error) }
        // Bytes after a request that ended the connection (`Connection: close`): that request's
        // response is the last (RFC 9112 §9.6), and the connection closes after it.
        if rejection == .parser(.closedConnection) { return }
        // A queued request the error cut off is dropped; whole ones before it are kept.
        while let last = queued.last {
            if case .end = last { break }
            queued.removeLast()
        }
        if let exchange, reader == .exchange {
            reader = .none
            closeAfterExchange = true
            exchange.requestFailed(
                HTTP1SemanticsHandler.logRejected(
                    rejection, client: context.channel.remoteAddress, logger: passThrough.logger, countingIn: nil, requestID: exchange.requestID
                ).0)
        } else if exchange != nil || routerResponsesPending > 0 || !queued.isEmpty {
            rejectedAfterPending = rejection
        } else {
            answerRejected(rejection, context)
        }
    }

    private func answerRejected(_ rejection: MalformedRequest, _ context: ChannelHandlerContext) {
        guard let rawWriter else { return }
        let (failure, requestID) = HTTP1SemanticsHandler.logRejected(
            rejection, client: context.channel.remoteAddress, logger: passThrough.logger, countingIn: passThrough.metrics)
        rawWriter.write(failure.closingResponseBytes(requestID: requestID))
        rawWriter.flushNow()
        closed = true
        // The client may still be sending what the parser could not read (a head over the limit).
        lingering.start(context, clientDoneSending: clientDoneSending)
    }

    func channelInactive(context: ChannelHandlerContext) {
        lingering.cancel()
        let exchange = exchange
        self.exchange = nil
        queued.removeAll()
        exchange?.clientClosed()
        context.fireChannelInactive()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        exchange?.clientWritabilityChanged(context.channel.isWritable)
        context.fireChannelWritabilityChanged()
    }

    // MARK: For the exchange

    /// Whether the client connection closes after the response in progress (shutdown, or the
    /// parser rejected the request's body).
    var closesAfterAnswer: Bool { quiesceHeld || closeAfterExchange }

    var isWritable: Bool { context?.channel.isWritable ?? false }

    /// Writes an exchange's serialized answer bytes (then `more`), flushed by `flusher` with the
    /// loop's other answers at the end of its round.
    func send(_ bytes: ByteBuffer, then more: ByteBuffer? = nil, flushingWith flusher: RoundFlusher) {
        guard let rawWriter else { return }
        rawWriter.write(bytes, then: more)
        flusher.flushAtEndOfRound(rawWriter)
    }

    /// The exchange's response has ended: go on with the connection's next request, or close.
    func exchangeFinished(_ finished: ChatExchange, closeConnection: Bool) {
        guard let context, exchange === finished else { return }
        exchange = nil
        if idleTimeout != nil { lastActivity = .now() }
        // Closing drops writes not yet flushed, and the answer's flush waits for the round's end.
        if quiesceHeld || closeConnection { context.flush() }
        if quiesceHeld {
            quiesceHeld = false
            queued.removeAll()
            context.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        } else if closeAfterExchange {
            queued.removeAll()
            closed = true
            reader = .none
            lingering.start(context, clientDoneSending: clientDoneSending)
        } else if closeConnection {
            queued.removeAll()
            closed = true
            context.close(promise: nil)
        } else {
            drain()  // then the parser's rejection, if one waits behind
        }
    }
}
