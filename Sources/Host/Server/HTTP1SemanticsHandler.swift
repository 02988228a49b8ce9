// What the router's HTTP/1 requests need beyond HTTPTypes: their version and keep-alive kept, and `Expect: 100-continue` answered.
internal import Logging
internal import NIOCore
internal import NIOHTTP1

extension HTTPRequestHead {
    /// Whether the client waits for `100 Continue` before sending the body: an HTTP/1.1 request
    /// with `Expect: 100-continue` (an HTTP/1.0 one's is ignored, RFC 9110 §10.1.1).
    var expectsContinue: Bool {
        guard version.major == 1, version.minor >= 1, headers.contains(name: "Expect") else { return false }
        return headers[canonicalForm: "Expect"].contains(where: { $0.lowercased() == "100-continue" })
    }

    /// Whether the request declares a body: a `Transfer-Encoding`, or a `Content-Length`
    /// other than 0.
    var declaresBody: Bool {
        headers.contains(name: "Transfer-Encoding") || headers.first(name: "Content-Length").map { $0 != "0" } ?? false
    }

    /// Whether the request declares a body longer than `maxBodyBytes`.
    func declaresBody(longerThan maxBodyBytes: Int) -> Bool {
        guard let length = headers.first(name: "Content-Length").flatMap(Int.init) else { return false }
        return length > maxBodyBytes
    }
}

extension HTTPHeaders {
    /// The value of field `name` as the router reads it (HTTPFields): every field of that name,
    /// without the whitespace around it (RFC 9110 5.5; NIO's parser keeps trailing spaces and
    /// tabs, the router's conversion drops them), joined with ", " in order (RFC 9110 5.3), or
    /// nil when there is none. A repeated field read by its first value (NIO's `first(name:)`)
    /// would make the pass-through judge a request with two keys, or two cache directives,
    /// otherwise than the router does; a key with a trailing space was refused by one and
    /// taken by the other.
    func combinedValue(_ name: String) -> String? {
        var combined: String?
        for field in self where Self.sameName(field.name, name) {
            let value = Self.trimmingWhitespace(field.value)
            combined = combined.map { "\($0), \(value)" } ?? value
        }
        return combined
    }

    /// `value` without leading and trailing spaces and tabs (the value itself when it has none).
    static func trimmingWhitespace(_ value: String) -> String {
        @inline(__always) func isWhitespace(_ byte: UInt8) -> Bool { byte == 0x20 || byte == 0x09 }
        let bytes = value.utf8
        guard let first = bytes.first, let last = bytes.last, isWhitespace(first) || isWhitespace(last) else { return value }
        var start = bytes.startIndex, end = bytes.endIndex
        while start < end, isWhitespace(bytes[start]) { start = bytes.index(after: start) }
        while start < end, isWhitespace(bytes[bytes.index(before: end)]) { end = bytes.index(before: end) }
        return String(value[start..<end])
    }

    /// ASCII case-insensitive equality, without allocating (every pass-through request asks).
    static func sameName(_ a: String, _ b: String) -> Bool {
        guard a.utf8.count == b.utf8.count else { return false }
        @inline(__always) func lower(_ byte: UInt8) -> UInt8 { byte >= 0x41 && byte <= 0x5A ? byte | 0x20 : byte }
        return zip(a.utf8, b.utf8).allSatisfy { lower($0) == lower($1) }
    }
}

/// Sits between NIO's HTTP/1 codec and the conversion to HTTPTypes for the router, and keeps
/// what that conversion loses:
///
/// - **The request's version and keep-alive.** HTTPTypes has no version, so every response
///   would go out as HTTP/1.1 (chunked, to an HTTP/1.0 client that cannot read chunks), and
///   Hummingbird closes a connection only on the exact header value `Connection: close`. So a
///   request that does not keep the connection alive (HTTP/1.0 without `keep-alive`, or any
///   `close` token in any case) reaches the router as `Connection: close`, and its response goes
///   out in the request's version with `Connection: close` (an HTTP/1.0 body without a length
///   then ends where the connection does). An HTTP/1.0 keep-alive is confirmed with
///   `Connection: keep-alive`, as such clients expect.
/// - **`Expect: 100-continue`.** NIO leaves it to the application and Hummingbird does not
///   answer it, so a client that asks would wait out its own timeout before sending the body.
///   An interim answer must not land inside another response: a request read while an earlier
///   response is still being written (a pipelining client, or one that sent its next request as
///   soon as it had the last body byte, before the router wrote the response's end) gets its
///   `100` when that response has ended. A request answered before its client has sent the
///   body it held back (a 413 for a body declared over the limit, an early 401) gets
///   `Connection: close`, and the connection closes after the answer, lingering, as the client
///   may be sending that body by now (`LingeringClose`): the parser would otherwise take the
///   client's next request for that body. Any other `Expect` (HTTP/1.0's
///   100-continue, which RFC 9110 §10.1.1 ignores, say) is removed before the router sees it.
/// - **Requests the parser rejects**, and those whose framing it lets through though faulty
///   (`MalformedRequest`), get an OpenAI-shaped 400 (431 for an oversized head) naming the
///   problem, then the close (lingering), rather than Hummingbird's empty 400.
/// - **A client that leaves** (closes its side, or resets) while a request of it is being
///   answered: `departure` hears of it, so routes can abandon their LLM calls.
final class HTTP1SemanticsHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    /// A request read whose response has not ended.
    private struct Unanswered {
        let version: HTTPVersion
        /// The id the router gives the request (this handler sets it when the client's is unusable).
        let requestID: String
        /// The request is for one of the gateway's completion routes, whose streams end with `[DONE]`.
        let completionRoute: Bool
        var keepAlive: Bool
        /// Still owed a `100 Continue`.
        var awaitsContinue: Bool
        /// The client holds its body back until a `100 Continue`, and neither that nor any of
        /// the body has come yet.
        var bodyHeldBack: Bool
        /// The connection closes after this response although the router would keep it: an
        /// HTTP/1.0 keep-alive request answered without a length (the close ends the body), one
        /// answered before the body it held back, one whose body the parser rejected.
        var closeAfterResponse = false
        /// The response's head has been written.
        var responseBegun = false
        /// The response is such a stream of server-sent events.
        var eventStream = false
    }

    private let maxBodyBytes: Int
    private let logger: Logger
    /// Oldest first: the front one's response is the one being written.
    private var unanswered = CircularBuffer<Unanswered>()
    /// Between a request's head and its end.
    private var readingBody = false
    /// What was rejected after requests whose responses were still to be written.
    private var rejectedAfterPending: MalformedRequest?
    /// Why a request head was refused here (`MalformedRequest(head:)`): what the parser
    /// delivers after it is unread input, as after a parser error.
    private var refusedHead: MalformedRequest?
    /// Told when the client leaves while a request is unanswered.
    let departure = ClientDeparture()
    /// The client has shut down its sending side: the router closes the connection after the
    /// answers in progress, which then say so (`Connection: close`).
    private var inputClosed = false
    /// The server is shutting down (`ChannelShouldQuiesceEvent`): answers not yet begun say
    /// they are the connection's last.
    private var quiescing = false
    /// After an answer given before the client's request was read to its end: what the client
    /// still sends is dropped until the connection closes.
    private let lingering = LingeringClose()

    private let metrics: GatehouseMetrics?
    /// The shutdown's time ran out: this handler answered the request in progress itself, and
    /// what the router still writes is dropped.
    private var stoppedByShutdown = false
    /// The handler before this one (the chat pass-through) has already refused the heads that
    /// `MalformedRequest(head:)` refuses: they are not checked twice.
    private let headsChecked: Bool

    /// Closes the connection when its client takes nothing of an answer for the send timeout.
    private var sendTimeout: ClientSendTimeout?

    init(maxBodyBytes: Int, logger: Logger, metrics: GatehouseMetrics?, headsChecked: Bool = false, sendTimeout: TimeAmount? = nil) {
        self.headsChecked = headsChecked
        self.sendTimeout = sendTimeout.map(ClientSendTimeout.init)
        self.maxBodyBytes = maxBodyBytes
        self.logger = logger
        self.metrics = metrics
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if lingering.isLingering, LingeringClose.isAboutUnreadInput(error) { return lingering.readMore(context) }
        // Bytes after a request that ended the connection (`Connection: close`): nothing is
        // answered after that request's response (RFC 9112 §9.6), which closes the connection.
        let rejection = MalformedRequest(error)
        if rejection == .parser(.closedConnection) { return }
        if readingBody, rejection != nil, let last = unanswered.indices.last {
            // The router answers (its read of the body fails), and then the connection must
            // close: the parser cannot find the next request.
            unanswered[last].keepAlive = false
            unanswered[last].closeAfterResponse = true
        }
        // In a body the router is reading, the error is the router's to answer (its read fails).
        guard let rejection, !readingBody else { return context.fireErrorCaught(error) }
        if unanswered.isEmpty {
            answer(rejection, context)
        } else {
            rejectedAfterPending = rejection  // answered once the responses before it have ended
        }
    }

    /// Answers a request that cannot be read, then closes (lingering): the next one cannot be
    /// found.
    private func answer(_ rejection: MalformedRequest, _ context: ChannelHandlerContext) {
        let (failure, requestID) = Self.logRejected(rejection, client: context.channel.remoteAddress, logger: logger, countingIn: metrics)
        writeClosingAnswer(failure, requestID: requestID, version: .http1_1, context)
        context.flush()
        // The client may still be sending what the parser could not read (a head over the limit).
        lingering.start(context, clientDoneSending: inputClosed)
    }

    /// Writes `error` as a whole response after which the connection closes (not flushed).
    private func writeClosingAnswer(_ error: OpenAIError, requestID: String, version: HTTPVersion, _ context: ChannelHandlerContext) {
        let body = ByteBuffer(data: error.body(requestID: requestID))
        let head = HTTPResponseHead(
            version: version, status: HTTPResponseStatus(statusCode: error.status.code),
            headers: HTTPHeaders(error.closingHeaderFields(requestID: requestID, bodyLength: body.readableBytes).map { ($0.name, $0.value) }))
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        context.write(wrapOutboundOut(.end(nil)), promise: nil)
    }

    /// The error a rejected request is answered with, and its new request id; logged at info,
    /// as the access log would show a 400 (there is no method or path to log).
    /// `metrics` counts it (`recordUnparsed`); nil where the answer is counted otherwise (an
    /// exchange's, whose access line counts it).
    /// - Parameter requestID: the id of the request the error cut short, when it had one (a
    ///   body that breaks the framing): its lines then share it. Else a new one.
    static func logRejected(
        _ error: MalformedRequest, client: SocketAddress?, logger: Logger, countingIn metrics: GatehouseMetrics?, requestID: String? = nil
    ) -> (OpenAIError, requestID: String) {
        let failure = OpenAIError.malformedRequest(error)
        metrics?.recordUnparsed(status: failure.status.code)
        let requestID = requestID ?? RequestIDGenerator.next()
        logger.info(
            "request rejected by the HTTP parser",
            metadata: [
                "status": .stringConvertible(failure.status.code), "reason": .string(failure.message), "client": .string(client?.ipAddress ?? "unknown"),
                "request_id": .string(requestID),
            ])
        return (failure, requestID)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // Gone, not done sending (see ClientDeparture): the LLM routes abandon their upstream
        // calls and answer 499; the others answer as usual (a `printf … | nc -N` health probe
        // half-closes too). The router closes the connection after that answer.
        if case .inputClosed? = event as? ChannelEvent {
            inputClosed = true
            if lingering.isLingering { return lingering.clientClosed(context) }
            if !unanswered.isEmpty { departure.depart() }
        }
        // The server is shutting down: the router closes the connection after the answer in
        // progress, which says so (`Connection: close`), or a client would send its next
        // request on a connection about to close (the pass-through's answers already say so).
        if event is ChannelShouldQuiesceEvent { quiescing = true }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        sendTimeout?.writabilityChanged(context, logger: logger)
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        sendTimeout?.cancel()
        lingering.cancel()
        if !unanswered.isEmpty { departure.depart() }
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !lingering.isLingering else { return lingering.readMore(context) }  // the rest of a refused body, dropped
        // After a refused head, its body (and what follows) is as unreadable as after a parser error.
        if let refusedHead { return errorCaught(context: context, error: refusedHead) }
        let part = unwrapInboundIn(data)
        guard case .head(var head) = part else {
            if case .end = part { readingBody = false }
            // The client is sending its body (it stopped waiting for the 100, or had it).
            if let last = unanswered.indices.last, unanswered[last].bodyHeldBack { unanswered[last].bodyHeldBack = false }
            return context.fireChannelRead(data)
        }
        if !headsChecked, let rejection = MalformedRequest(head: head) {
            refusedHead = rejection
            return errorCaught(context: context, error: rejection)
        }
        readingBody = true
        let keepAlive = head.isKeepAlive
        let expectsContinue = head.expectsContinue
        var changed = false
        if let merged = RequestTarget.mergingSlashes(head.uri) {
            head.uri = merged
            changed = true
        }
        // The id is settled here, where an answer may have to be written without the router
        // (see `close`), so that answer and the router's log lines carry the same one.
        let clientID = head.headers.combinedValue("X-Request-ID")
        let requestID = RequestIDMiddleware.requestID(clientValue: clientID)
        if requestID != clientID {
            head.headers.replaceOrAdd(name: "X-Request-ID", value: requestID)
            changed = true
        }
        unanswered.append(
            Unanswered(
                version: head.version, requestID: requestID, completionRoute: Self.isCompletionRoute(head.uri), keepAlive: keepAlive,
                awaitsContinue: expectsContinue && !head.declaresBody(longerThan: maxBodyBytes), bodyHeldBack: expectsContinue))
        if unanswered.count == 1 { sendContinueIfAwaited(context) }
        if !expectsContinue, head.headers.contains(name: "Expect") {
            // An expectation not acted on (HTTP/1.0's 100-continue, which RFC 9110 ignores, or
            // another) is not the routes' to see: only a client waiting for a 100 keeps its `Expect`.
            head.headers.remove(name: "Expect")
            changed = true
        }
        if !keepAlive, head.headers.first(name: "Connection") != "close" {
            head.headers.replaceOrAdd(name: "Connection", value: "close")
            changed = true
        }
        context.fireChannelRead(changed ? wrapInboundOut(.head(head)) : data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if stoppedByShutdown {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        switch unwrapOutboundIn(data) {
        case .head(var head) where head.status.code >= 200 || head.status == .switchingProtocols:
            guard var request = unanswered.first else { return context.write(data, promise: promise) }
            // A final answer written without reading the body (an early 401, say): no 100 now.
            request.awaitsContinue = false
            request.responseBegun = true
            request.eventStream = request.completionRoute && head.headers.first(name: "Content-Type")?.hasPrefix("text/event-stream") == true
            if request.bodyHeldBack || (readingBody && unanswered.count == 1) {
                // The body was never sent, or is still coming for an answer that did not need it
                // (an early 401 or 429): this answer ends the connection (see the type's doc)
                // rather than wait for, and read, the rest of a body nobody will use.
                request.keepAlive = false
                request.closeAfterResponse = true
            }
            unanswered[unanswered.startIndex] = request
            let toHTTP10 = request.version == .http1_0 && head.version != .http1_0
            if inputClosed || quiescing { request.keepAlive = false }
            guard toHTTP10 || !request.keepAlive else { return context.write(data, promise: promise) }
            if toHTTP10 {
                head.version = .http1_0
                // HTTP/1.0 has no chunks: a body without a length ends where the connection does.
                head.headers.remove(name: "Transfer-Encoding")
                if request.keepAlive, !head.headers.contains(name: "Content-Length"), head.status.mayHaveResponseBody {
                    request.closeAfterResponse = true
                    unanswered[unanswered.startIndex] = request
                }
            }
            if !request.keepAlive || request.closeAfterResponse {
                head.headers.replaceOrAdd(name: "Connection", value: "close")
            } else {
                head.headers.replaceOrAdd(name: "Connection", value: "keep-alive")  // an HTTP/1.0 client assumes a close unless told
            }
            context.write(wrapOutboundOut(.head(head)), promise: promise)
        case .end:
            guard let request = unanswered.popFirst() else { return context.write(data, promise: promise) }
            // Answered before its body was read (held back for a 100, cut off by a parser error,
            // or refused early): the client may still be sending it.
            let bodyUnread = readingBody && unanswered.isEmpty
            // The router, told keep-alive, would wait for another request; and for the rest of an
            // unread body it would wait without reading it, the client stalled until the idle
            // timeout. So this handler closes, lingering while the client may still be sending.
            if request.closeAfterResponse || (bodyUnread && !request.keepAlive) {
                context.writeAndFlush(data, promise: promise)
                if bodyUnread {
                    lingering.start(context, clientDoneSending: inputClosed)
                } else {
                    context.close(promise: nil)
                }
                return
            }
            context.write(data, promise: promise)
            if unanswered.isEmpty, let rejected = rejectedAfterPending {
                rejectedAfterPending = nil
                answer(rejected, context)
            }
            sendContinueIfAwaited(context)
        default:
            context.write(data, promise: promise)
        }
    }

    /// Hummingbird's connection handler closes the input when its task is cancelled, which
    /// happens only when the shutdown's `shutdown_timeout` has run out. The router's answer in
    /// progress can then no longer be written (a cancelled task's writes are dropped), so the
    /// client would see the connection drop: a failure SDKs report as a network error. It is
    /// told instead, as the pass-through tells its clients: a 503 `server_shutting_down` when
    /// its answer has not begun, an error event and `[DONE]` ending a completion stream that has;
    /// another body (a plugin's) is cut short (its framing shows it). Then the connection closes.
    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        guard mode == .input, !stoppedByShutdown, let request = unanswered.first else { return context.close(mode: mode, promise: promise) }
        // The route, cancelled, ends with this error too, so its log line and metrics say 503.
        departure.depart(.serverStopping)
        let error = OpenAIError.serverShuttingDown
        if !request.responseBegun {
            writeClosingAnswer(error, requestID: request.requestID, version: request.version, context)
        } else if request.eventStream {
            var events = ByteBuffer()
            events.writeEventStreamEnd(error: error, requestID: request.requestID)
            context.write(wrapOutboundOut(.body(.byteBuffer(events))), promise: nil)
            context.write(wrapOutboundOut(.end(nil)), promise: nil)
        }
        context.flush()
        stoppedByShutdown = true
        unanswered.removeAll()
        lingering.cancel()
        context.close(mode: .all, promise: promise)
    }

    /// Whether `target` is `/v1/chat/completions` or `/v1/completions` (a plugin's event stream
    /// has its own ending).
    private static func isCompletionRoute(_ target: String) -> Bool {
        let path = target.prefix { $0 != "?" }
        return path == "/v1/chat/completions" || path == "/v1/completions"
    }

    /// The `100` of the oldest unanswered request, if it is owed one.
    private func sendContinueIfAwaited(_ context: ChannelHandlerContext) {
        guard var request = unanswered.first, request.awaitsContinue else { return }
        request.awaitsContinue = false
        request.bodyHeldBack = false
        unanswered[unanswered.startIndex] = request
        context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: .continue))), promise: nil)
    }
}

/// The request target as the router's path checks must see it.
enum RequestTarget {
    /// `target` with each run of slashes in its path merged into one (nginx's `merge_slashes`),
    /// or nil when there is none. The router skips empty path segments, so `//v1/chat/completions`
    /// reaches the chat route; unmerged, it would escape every check that compares the path's
    /// text, such as plugin middleware scoped to `/v1/chat/`. The query is left as it is.
    static func mergingSlashes(_ target: String) -> String? {
        let slash = UInt8(ascii: "/")
        // Most targets have no "//" at all: decided without allocating.
        var previous: UInt8 = 0
        let hasDoubleSlash = target.utf8.contains { byte in
            defer { previous = byte }
            return byte == slash && previous == slash
        }
        guard hasDoubleSlash else { return nil }
        let bytes = Array(target.utf8)
        let pathStart: Int
        if bytes.first == slash {
            pathStart = 0  // origin-form
        } else if let scheme = target.range(of: "://") {
            // absolute-form: the path starts at the first slash after the authority
            let afterScheme = target.utf8.distance(from: target.utf8.startIndex, to: scheme.upperBound)
            guard let first = bytes[afterScheme...].firstIndex(of: slash) else { return nil }
            pathStart = first
        } else {
            return nil  // authority-form: no path
        }
        let pathEnd = bytes[pathStart...].firstIndex { $0 == UInt8(ascii: "?") || $0 == UInt8(ascii: "#") } ?? bytes.count
        func repeatsSlash(_ index: Int) -> Bool { index > pathStart && bytes[index] == slash && bytes[index - 1] == slash }
        guard (pathStart..<pathEnd).contains(where: repeatsSlash) else { return nil }
        var merged: [UInt8] = []
        merged.reserveCapacity(bytes.count)
        merged.append(contentsOf: bytes[..<pathStart])
        for index in pathStart..<pathEnd where !repeatsSlash(index) { merged.append(bytes[index]) }
        merged.append(contentsOf: bytes[pathEnd...])
        return String(decoding: merged, as: UTF8.self)
    }
}
