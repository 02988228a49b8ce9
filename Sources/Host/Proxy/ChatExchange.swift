// One chat completion served by the pass-through: checks, cache, upstream call, and the answer (JSON or SSE).
internal import Foundation
internal import HTTPTypes
internal import Logging
internal import NIOCore
internal import NIOHTTP1
#if canImport(Glibc)
internal import Glibc
#endif

/// One `POST /v1/chat/completions` from its head to the end of its answer. Runs entirely on
/// the client connection's event loop, as does the upstream connection it uses.
///
/// The rules are the router path's, through the same helpers: `APIKeyCheck`, the rate
/// limiter's `refusal`, `ChatRequest.parse` (or `ChatRequestScan` where it answers for it), the
/// shared cache, `OpenAIBackend.upstreamBody` and its SSE classification,
/// `UpstreamClient.upstreamStatusError`, `UpstreamFailure`, and the access-log line.
///
/// A reused keep-alive connection that the upstream closes right after the request went out
/// (within `retryWindow`, before any answer) is retried once on a new connection, within the
/// same deadline. A request can reach the upstream twice in that race (harmless for chat
/// completions, which change nothing upstream); a connection lost later, mid-generation, is not
/// retried, as the work (and a paid upstream's bill) would be done twice.
final class ChatExchange: UpstreamResponseDelegate {
    private enum Phase {
        /// Reading the client's body.
        case reading
        /// Waiting for a connection or for the upstream's response head.
        case waiting
        /// Collecting a whole upstream reply (non-streamed answers, and error replies).
        case collecting
        /// Relaying server-sent events to the client.
        case streaming
        /// The client has its answer; the upstream reply is read to its end so the
        /// connection can be reused.
        case draining
        case done
    }

    /// The client connection's handler, until the client has its answer or goes away: the
    /// upstream reply may still be drained after that. Strong and cleared by hand, not weak: a
    /// weak reference gives the handler a side table, which slows every retain and release of
    /// it (NIO's pipeline makes several per request).
    private var handler: ChatPassThroughHandler?
    private let passThrough: ChatPassThrough
    private let loop: PassThroughLoop
    private var pool: UpstreamConnectionPool { loop.pool }
    private let head: HTTPRequestHead
    /// `head.isKeepAlive`, which scans the header fields, read once.
    private let keepAlive: Bool
    private let remoteAddress: String
    let requestID: String
    /// The request's logger, whose lines carry the request id. Built only for the rare lines
    /// other than the access line, which is given the id directly (no metadata copy per request).
    private var logger: Logger {
        var logger = passThrough.logger
        logger[metadataKey: "request_id"] = .string(requestID)
        return logger
    }
    private let started = ContinuousClock.now
    private var phase = Phase.reading

    private var body = ByteBuffer()
    private var bodyTooLarge = false
    /// The checks the head alone decides (key, rate, encoding) have been made.
    private var headChecked = false
    /// What those checks (and a declared length over the limit) refused the request with.
    private var heldRefusal: OpenAIError?
    private var stream = false
    private var includeUsage = false
    /// Where the answer is stored when it comes (nil: not cached), and what `X-Cache` says of it.
    private var cacheKey: String?
    private var cacheOutcome = CacheOutcome.bypass

    /// The upstream request's body: the client's bytes as they came, or a rebuilt body.
    private var upstreamRequest: ByteBuffer?
    /// Members to splice into `upstreamRequest` right after its opening brace (at `offset` into
    /// its readable bytes), written as the request is serialized: no spliced copy is made.
    private var upstreamSplice: (members: String, offset: Int)?
    private var connection: UpstreamConnection?
    private var retried = false
    private var upstreamStarted: ContinuousClock.Instant
    private var upstreamResponse: UpstreamReplyHead?
    private var reply = ByteBuffer()
    private var partialLine = ByteBuffer()
    private var promptTokens = 0
    private var completionTokens = 0
    /// The stream's usage chunk has come (llama.cpp's server sends none).
    private var usageSeen = false
    /// The status the client was (or is being) sent.
    private var status = 0
    /// A stream's response head waits for its first events and goes out in their buffer: one
    /// allocation and one write fewer per stream than a head of its own (which was not flushed
    /// ahead of those events either).
    private var streamHeadPending = false
    /// A stream's time to its head and first events (written to the client), for the access line.
    private var firstByte: Duration?
    /// When the upstream wait ends (checked by the loop's sweep; nil when not waiting).
    private(set) var deadline: NIODeadline?
    /// This exchange's place in the loop's list of deadlines.
    var watchIndex: Int?
    /// When the upstream last sent something (set when the call starts; read for streams only).
    private var lastUpstreamRead = NIODeadline.uptimeNanoseconds(0)

    init(head: HTTPRequestHead, handler: ChatPassThroughHandler, loop: PassThroughLoop, remoteAddress: String) {
        self.head = head
        keepAlive = head.isKeepAlive
        self.handler = handler
        passThrough = handler.passThrough
        self.loop = loop
        self.remoteAddress = remoteAddress
        upstreamStarted = started
        // Joined as the router reads it: two ids are one unusable value, and a new id is made.
        requestID = RequestIDMiddleware.requestID(clientValue: head.headers.combinedValue("X-Request-ID"))
        passThrough.metrics?.inFlight.increment()
        pool.flusher.exchangeBegan()
        if let length = head.headers.first(name: "Content-Length").flatMap(Int.init), length > passThrough.maxBodyBytes { bodyTooLarge = true }
    }

    // MARK: The client's request

    func receive(_ buffer: ByteBuffer) {
        guard !bodyTooLarge, heldRefusal == nil else { return }
        guard body.readableBytes + buffer.readableBytes <= passThrough.maxBodyBytes else {
            bodyTooLarge = true
            body = ByteBuffer()
            // Refused now (answered at this read's end, then the connection closes, lingering),
            // not at the body's end: a chunked body declares no length and may never end, and
            // an SDK would upload all of it before learning of the 413. The router does the same.
            do throws(OpenAIError) {
                try checkHead()  // the router's order: key and rate before size
                heldRefusal = .bodyTooLarge
            } catch {
                heldRefusal = error
            }
            return
        }
        if body.readableBytes == 0 {
            body = buffer  // the usual one-read body: kept as the read's slice, not copied
        } else {
            var buffer = buffer
            body.writeBuffer(&buffer)
        }
    }

    /// The request cannot be read to its end (its body broke HTTP's framing), or was refused
    /// at its head and its end is not at hand: answer `error`, after which the connection closes.
    func requestFailed(_ error: OpenAIError) {
        guard phase == .reading else { return }
        phase = .waiting
        body = ByteBuffer()
        answer(error)
    }

    /// Makes the checks the head alone decides (the router's order: key, rate, encoding,
    /// declared size) before any of the body is read, and returns whether they refused the
    /// request: a client without the key must not have the gateway hold `max_body_bytes` for it
    /// while it sends, or takes its time sending. A refused request's body is dropped as it
    /// comes; the refusal is answered at the request's end when that comes in the same read
    /// (the usual small request: the connection is kept), else by `answerHeldRefusal`.
    func refuseBeforeBody() -> Bool {
        guard head.declaresBody else { return false }  // checked at its end, which is at hand
        do {
            try checkHead()
            if bodyTooLarge { heldRefusal = .bodyTooLarge }
        } catch {
            heldRefusal = error
        }
        return heldRefusal != nil
    }

    /// The request was refused at its head and its end has not come: answer now, after which
    /// the connection closes (lingering), as the client may still be sending the body.
    func answerHeldRefusal() {
        guard let heldRefusal else { return }
        requestFailed(heldRefusal)
    }

    /// Refused at its head, and its end not yet read.
    var awaitsEndOfRefusedBody: Bool { heldRefusal != nil && phase == .reading }

    /// The key (its header values are looked up only when one is required), the rate, and the
    /// body's encoding.
    private func checkHead() throws(OpenAIError) {
        guard !headChecked else { return }
        headChecked = true
        let clientID =
            passThrough.apiKeys.isRequired
            ? try passThrough.apiKeys.verify(
                apiKeyHeader: head.headers.combinedValue("X-API-Key"), authorization: head.headers.combinedValue("Authorization"),
                path: ChatPassThrough.path, chargingFailuresTo: passThrough.limiter, address: remoteAddress)
            : nil
        if let refusal = passThrough.limiter?.refusal(client: clientID, address: remoteAddress) { throw refusal }
        if let refusal = ContentEncodingMiddleware.refusal(contentEncoding: head.headers.combinedValue("Content-Encoding")) { throw refusal }
    }

    /// The whole request is in (or, for a body declared over the limit that the client holds
    /// back for a `100 Continue`, will never come): check it (in the router's order: key, rate,
    /// encoding, size, JSON), answer from the cache, or call the upstream.
    func requestEnded() {
        guard phase == .reading else { return }
        phase = .waiting
        if let heldRefusal { return answer(heldRefusal) }
        do {
            try checkHead()
            guard !bodyTooLarge else {
                throw OpenAIError.bodyTooLarge
            }
            // Requests that need neither the cache key nor a rebuilt body skip decoding.
            if let scan = body.withUnsafeReadableBytes(ChatRequestScan.scan), scan.stream || passThrough.cache == nil {
                stream = scan.stream
                includeUsage = scan.includeUsage
                upstreamRequest = body
                if let members = scan.upstreamPrefix, let brace = body.readableBytesView.firstIndex(of: UInt8(ascii: "{")) {
                    upstreamSplice = (members, brace - body.readerIndex + 1)
                }
            } else {
                let request = try ChatRequest.parse(body)
                stream = request.stream
                includeUsage = request.includeUsage
                if !stream, let cache = passThrough.cache {
                    let use = CacheUse(cacheControl: head.headers.combinedValue("Cache-Control"))
                    let key = request.cacheKey(backend: passThrough.backendName)
                    if use == .normal, let cached = cache.get(key) {
                        passThrough.metrics?.cacheHits.increment()
                        answer(.ok, contentType: "application/json", cache: CacheOutcome.hit.rawValue, body: ByteBuffer(data: cached.json))
                        return
                    }
                    passThrough.metrics?.recordCacheMiss(use)
                    if let stored = use.storedOutcome {
                        cacheKey = key
                        cacheOutcome = stored
                    }
                }
                upstreamRequest = ByteBuffer(data: OpenAIBackend.upstreamBody(request, stream: stream))
            }
            body = ByteBuffer()
            callUpstream()
        } catch {
            answer(error as? OpenAIError ?? OpenAIError(.internalServerError, "internal error: \(error)"))
        }
    }

    // MARK: The upstream call

    /// How soon after the request went out a reused connection's loss is the keep-alive race
    /// (the upstream closing it as idle just as it was reused), and so retried.
    static let retryWindow = TimeAmount.seconds(1)
    /// When the request went out on the connection in use.
    private var sentAt = NIODeadline.uptimeNanoseconds(0)

    /// - Parameter retry: the one retry on a fresh connection, within the first call's deadline.
    private func callUpstream(retry: Bool = false) {
        if !retry {
            upstreamStarted = ContinuousClock.now
            lastUpstreamRead = .now()
            armTimer()
        }
        if !retry, let connection = pool.takeIdle() {
            connected(.success(connection))  // kept alive from an earlier request: no callback needed
        } else {
            pool.connect { [self] result in connected(result) }
        }
    }

    private func connected(_ result: Result<UpstreamConnection, UpstreamFailure>) {
        switch result {
        case .success(let connection):
            guard phase == .waiting else {
                pool.release(connection)
                return
            }
            self.connection = connection
            sentAt = .now()
            let body = upstreamRequest ?? ByteBuffer()
            let length = body.readableBytes + (upstreamSplice?.members.utf8.count ?? 0)
            if length <= Self.bodyCopiedBehindHead {
                var request = serializedUpstreamHead(bodyLength: length, roomForBody: length)
                writeUpstreamBody(body, to: &request)
                connection.send(request, to: self)
            } else if upstreamSplice != nil {
                var spliced = ByteBufferAllocator().buffer(capacity: length)
                writeUpstreamBody(body, to: &spliced)
                connection.send(serializedUpstreamHead(bodyLength: length), then: spliced, to: self)
            } else {
                connection.send(serializedUpstreamHead(bodyLength: length), then: body, to: self)
            }
        case .failure(let failure):
            guard phase == .waiting else { return }
            fail(failure)
        }
    }

    /// Writes the upstream body to `buffer`: `body`, with `upstreamSplice`'s members (and their
    /// trailing comma) after its opening brace.
    private func writeUpstreamBody(_ body: ByteBuffer, to buffer: inout ByteBuffer) {
        guard let (members, offset) = upstreamSplice else {
            buffer.writeImmutableBuffer(body)
            return
        }
        body.withUnsafeReadableBytes { bytes in
            buffer.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[..<offset]))
            buffer.writeString(members)
            buffer.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[offset...]))
        }
    }

    /// The upstream request head as bytes: `ChatPassThrough.upstreamHeadPrefix` (request line and
    /// fixed fields), the length and the request id, in a buffer with room for `roomForBody`
    /// bytes more (a body written behind it). Every value is header-safe: the id passed
    /// `RequestIDMiddleware.isAcceptable` or was generated, and the prefix was checked when the
    /// pass-through was set up.
    private func serializedUpstreamHead(bodyLength: Int, roomForBody: Int = 0) -> ByteBuffer {
        let prefix = passThrough.upstreamHeadPrefix
        var request = ByteBufferAllocator().buffer(capacity: prefix.count + 48 + requestID.utf8.count + roomForBody)
        request.writeBytes(prefix)
        request.writeStaticString("Content-Length: ")
        request.writeString(String(bodyLength))
        request.writeStaticString("\r\nX-Request-ID: ")
        request.writeString(requestID)
        request.writeStaticString("\r\n\r\n")
        return request
    }

    /// Streams are bounded by silence between reads (and, as on the router path, by
    /// `UpstreamClient.streamDeadline` in all); whole answers by a deadline.
    private func armTimer() {
        let limit = TimeAmount.nanoseconds(Int64(passThrough.timeout * 1_000_000_000))
        if stream || phase == .draining {
            deadline = min(lastUpstreamRead + limit, streamEnd)
        } else {
            deadline = NIODeadline.now() + limit
        }
        loop.watch(self)
    }

    /// When a stream must end however busy it is.
    private lazy var streamEnd = NIODeadline.now() + .seconds(Int64(max(passThrough.timeout, UpstreamClient.streamDeadline)))

    private func cancelTimer() {
        deadline = nil
        loop.unwatch(self)
    }

    /// Called by the loop's sweep once `deadline` has passed.
    func deadlinePassed() {
        cancelTimer()
        let now = NIODeadline.now()
        let silent = now >= lastUpstreamRead + .nanoseconds(Int64(passThrough.timeout * 1_000_000_000))
        if stream || phase == .draining, phase != .done, !silent, now < streamEnd {
            armTimer()  // something was read since the timer was set: silence has not lasted yet
            return
        }
        if phase == .streaming, silent, handler?.isWritable == false {
            // Reading is held for a client that has taken nothing for the timeout: its stall,
            // not the upstream's silence (nginx's send_timeout ends such a client too).
            logger.info("client stopped reading its stream", metadata: ["timeout_s": .string(UpstreamFailure.seconds(passThrough.timeout))])
            return endStream(
                error: OpenAIError(.requestTimeout, "the client took nothing for \(UpstreamFailure.seconds(passThrough.timeout))", code: "client_read_timeout"),
                blamingUpstream: false)
        }
        switch phase {
        case .waiting, .collecting, .streaming:
            // Silence past the timeout, else the whole time allowed (a stream's hour, an answer's timeout).
            let failure: UpstreamFailure = stream && silent ? .silence : .deadline
            let limit = stream && !silent ? max(passThrough.timeout, UpstreamClient.streamDeadline) : passThrough.timeout
            let error = failure.error(target: target, timeout: limit)
            if phase == .streaming {
                endStream(error: error)  // closes the connection
            } else {
                connection?.close()
                connection = nil
                recordUpstreamFailure()
                answer(error)
            }
        case .draining:
            connection?.close()
            connection = nil
            phase = .done
        case .reading, .done:
            break
        }
    }

    func upstreamHead(_ head: UpstreamReplyHead) {
        guard phase == .waiting else { return }
        upstreamResponse = head
        if stream { lastUpstreamRead = .now() }
        if stream, head.status == 200 {
            phase = .streaming
            streamHeadPending = true  // the 200 is the client's status once its head is written
        } else {
            phase = .collecting
        }
    }

    func upstreamBody(_ buffer: ByteBuffer) {
        // Silence is what bounds streams (their error replies and draining too); a whole answer
        // has one deadline.
        if stream { lastUpstreamRead = .now() }
        switch phase {
        case .collecting:
            guard reply.readableBytes + buffer.readableBytes <= UpstreamClient.maxReplyBytes else {
                connection?.close()
                connection = nil
                fail(.tooLarge(UpstreamClient.maxReplyBytes))
                return
            }
            if reply.readableBytes == 0 {
                reply = buffer
            } else {
                var buffer = buffer
                reply.writeBuffer(&buffer)
            }
        case .streaming:
            relay(buffer)
        default:
            break
        }
    }

    func upstreamEnd(keepAlive: Bool) {
        if let connection {
            self.connection = nil
            if keepAlive { pool.release(connection) } else { connection.close() }
        }
        switch phase {
        case .collecting: replyCollected()
        case .streaming:
            // A head still pending means no event went out: the upstream sent none, which is
            // reported rather than passed on as an empty success. (A last line without its line
            // break is an unfinished event, which SSE discards.)
            endStream(error: streamHeadPending ? emptyStreamError() : nil)
        case .draining:
            cancelTimer()
            phase = .done
        default: break
        }
    }

    func upstreamFailed(_ failure: UpstreamFailure) {
        let reused = connection?.reused ?? false
        // Any byte back (part of a head, a 100) means the upstream read the request, and may
        // be generating: sent again, it would be run, and billed, twice.
        let unanswered = !(connection?.handler.heardSinceRequest ?? true)
        connection = nil
        switch phase {
        case .waiting:
            // A keep-alive connection the upstream closed (or reset) just as it was reused,
            // before any answer: try once on a new one. Timeouts are not retried: that would
            // double the wait.
            if reused, unanswered, !retried, failure.isConnectionLoss, NIODeadline.now() < sentAt + Self.retryWindow {
                retried = true
                callUpstream(retry: true)
                return
            }
            fail(failure)
        case .collecting:
            fail(failure)
        case .streaming:
            endStream(error: failure.error(target: target, timeout: passThrough.timeout))
        case .draining:
            cancelTimer()
            phase = .done
        case .reading, .done:
            break
        }
    }

    private var target: String { passThrough.target.baseURL + passThrough.upstreamPath }

    /// Why a stream the upstream ended cleanly, but without a single event, failed.
    private func emptyStreamError() -> OpenAIError {
        let contentType = upstreamResponse?.contentType ?? "none"
        let reason =
            contentType.lowercased().hasPrefix("text/event-stream")
            ? "ended the stream without sending any event"
            : "answered the stream request with Content-Type \(contentType), not text/event-stream"
        return OpenAIError(.badGateway, "\(passThrough.backendName) upstream \(reason)", code: "upstream_invalid")
    }

    private func fail(_ failure: UpstreamFailure) {
        recordUpstreamFailure()
        answer(failure.error(target: target, timeout: passThrough.timeout))
    }

    private func recordUpstreamFailure() {
        loop.recordUpstreamFailure(streamed: stream, duration: ContinuousClock.now - upstreamStarted)
    }

    /// A whole upstream reply is in: pass it on (and cache it), or report the upstream's error.
    private func replyCollected() {
        guard let head = upstreamResponse else { return }
        guard head.status == 200 else {
            recordUpstreamFailure()
            answer(
                UpstreamClient.upstreamStatusError(
                    status: head.status, body: reply, backend: passThrough.backendName, retryAfter: head.retryAfter, masking: passThrough.secrets))
            return
        }
        do {
            let tokens = try reply.withUnsafeReadableBytes { try OpenAIBackend.tokenCounts(inReply: $0, masking: passThrough.secrets) }
            loop.recordUpstream(streamed: false, duration: ContinuousClock.now - upstreamStarted, prompt: tokens.prompt, completion: tokens.completion)
            if let cacheKey, let cache = passThrough.cache {
                cache.put(cacheKey, ChatCompletion(json: Data(reply.readableBytesView), promptTokens: tokens.prompt, completionTokens: tokens.completion))
            }
            answer(.ok, contentType: "application/json", cache: cacheOutcome.rawValue, body: reply)
        } catch {
            recordUpstreamFailure()
            answer(error as? OpenAIError ?? OpenAIError(.badGateway, "\(error)"))
        }
    }

    // MARK: Server-sent events

    /// Re-frames the complete `data:` lines of one upstream read as one write to the client.
    private func relay(_ buffer: ByteBuffer) {
        var input = buffer
        if partialLine.readableBytes > 0 {
            // The line an earlier read began has no end yet; a read that does not end it either
            // is only kept (so a long line trickling in is not searched again at every read),
            // up to the most the gateway holds for one line.
            if ByteSearch.find(0x0a, in: input) == nil {
                guard partialLine.readableBytes + input.readableBytes <= UpstreamClient.maxReplyBytes else {
                    partialLine = ByteBuffer()
                    endStream(error: .upstreamLineTooLong(limit: UpstreamClient.maxReplyBytes))
                    return
                }
                partialLine.writeBuffer(&input)
                return
            }
            partialLine.writeBuffer(&input)
            input = partialLine
            partialLine = ByteBuffer()
        }
        var output = makeStreamBuffer(capacity: input.readableBytes + 64)
        var finished = false
        var streamError: OpenAIError?
        let consumed = input.withUnsafeReadableBytes { bytes -> Int in
            guard let base = bytes.baseAddress else { return 0 }
            // Most reads hold only ordinary chunks: one check of the whole read spares one per payload.
            let mayNeedParsing = OpenAIBackend.needsParsing(bytes)
            // Events already written as the client gets them ("data: X\n\n", nothing to parse)
            // are copied in runs, not one by one: the bytes are the same.
            var runStart = -1
            var runEnd = -1
            func copyRun() {
                guard runStart >= 0 else { return }
                output.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[runStart..<runEnd]))
                runStart = -1
            }
            var next = 0
            while !finished, streamError == nil, let hit = memchr(base + next, 0x0a, bytes.count - next) {
                let lineStart = next
                var lineEnd = base.distance(to: UnsafeRawPointer(hit))
                next = lineEnd + 1
                if lineEnd > lineStart, bytes[lineEnd - 1] == UInt8(ascii: "\r") { lineEnd -= 1 }
                // event:, id: and comment lines carry nothing to relay.
                guard lineEnd - lineStart >= 5, memcmp(base + lineStart, "data:", 5) == 0 else {
                    copyRun()
                    continue
                }
                var payloadStart = lineStart + 5
                if payloadStart < lineEnd, bytes[payloadStart] == UInt8(ascii: " ") { payloadStart += 1 }
                let payload = UnsafeRawBufferPointer(rebasing: bytes[payloadStart..<lineEnd])
                if payload.count == 6, memcmp(payload.baseAddress!, "[DONE]", 6) == 0 {
                    finished = true
                    break
                }
                // Canonical: "data: " (one space), no CR, the blank line right behind, no parsing.
                if payloadStart == lineStart + 6, lineEnd + 1 == next, next < bytes.count, bytes[next] == 0x0a,
                    !mayNeedParsing || !OpenAIBackend.needsParsing(payload)
                {
                    if runStart < 0 { runStart = lineStart }
                    next += 1  // the blank line, which ends the event and writes nothing itself
                    runEnd = next
                    continue
                }
                copyRun()
                do {
                    try appendEvents(for: payload, parse: mayNeedParsing, to: &output)
                } catch {
                    streamError = passThrough.secrets.masked(error as? OpenAIError ?? OpenAIError(.badGateway, "\(error)"))
                }
            }
            copyRun()
            return next
        }
        input.moveReaderIndex(forwardBy: consumed)
        if finished || streamError != nil {
            endStream(error: streamError, appendingTo: &output)
            return
        }
        if input.readableBytes > 0 { partialLine = input }
        if output.readableBytes > 0 {
            sendStream(&output, ending: false)
        } else if ChunkedBody.holdsHead(output) {
            // No whole event yet (part of a line): the head waits for the first one.
            streamHeadPending = true
        }
        if handler?.isWritable == false { connection?.handler.holdReads(true) }
    }

    /// One upstream payload as client events: ordinary chunks as their bytes, usage and error
    /// payloads through the same classification as the router path.
    private func appendEvents(for payload: UnsafeRawBufferPointer, parse mayNeedParsing: Bool, to output: inout ByteBuffer) throws {
        if !mayNeedParsing || !OpenAIBackend.needsParsing(payload) {
            output.writeStaticString("data: ")
            output.writeBytes(payload)
            output.writeStaticString("\n\n")
            return
        }
        for event in try OpenAIBackend.events(for: Data(payload), forwardUsage: includeUsage) {
            switch event {
            case .chunk(let data):
                output.writeStaticString("data: ")
                output.writeBytes(data)
                output.writeStaticString("\n\n")
            case .usage(let prompt, let completion):
                usageSeen = true
                promptTokens = prompt
                completionTokens = completion
            }
        }
    }

    /// A buffer for the stream's next write, its readable bytes starting after room for the
    /// chunk's size line. The first begins with the response head (see `streamHeadPending`).
    private func makeStreamBuffer(capacity: Int) -> ByteBuffer {
        guard streamHeadPending else { return ChunkedBody.makeBuffer(capacity: capacity) }
        streamHeadPending = false
        status = 200
        var head = responseHead(
            .ok, contentType: "text/event-stream", cache: "BYPASS", capacity: ResponseHead.typicalCapacity + ChunkedBody.capacity(for: capacity))
        head.add("Cache-Control", "no-cache")
        // HTTP/1.0 streams end by closing; 1.1 ones are chunked (as NIO's encoder frames them).
        if chunked { head.add("Transfer-Encoding", "chunked") }
        var buffer = head.finish()
        ChunkedBody.reserveHeadroom(in: &buffer)
        return buffer
    }

    /// Writes a buffer from `makeStreamBuffer`: its events as one chunk (HTTP/1.1; followed by
    /// the last chunk when `ending`), behind the response head if the buffer begins with it.
    private func sendStream(_ output: inout ByteBuffer, ending: Bool) {
        if firstByte == nil { firstByte = ContinuousClock.now - started }
        ChunkedBody.seal(&output, framed: chunked, last: ending)
        handler?.send(output, flushingWith: pool.flusher)
    }

    /// Ends the client's stream: an error event if the upstream failed, then `[DONE]`, in one
    /// write; or, when nothing has been sent yet, the error as the answer itself.
    private func endStream(error: OpenAIError?, blamingUpstream: Bool = true) {
        var output = makeStreamBuffer(capacity: 256)
        endStream(error: error, blamingUpstream: blamingUpstream, appendingTo: &output)
    }

    /// Ends the client's stream after the events already in `output` (unframed), in one write.
    /// `inout`, so the buffer stays uniquely referenced and grows in place: a copy passed by
    /// value would be duplicated (with its allocation) by the first byte appended.
    private func endStream(error: OpenAIError?, blamingUpstream: Bool = true, appendingTo output: inout ByteBuffer) {
        guard phase == .streaming else { return }
        if error != nil, blamingUpstream { recordUpstreamFailure() }
        if let error, blamingUpstream, output.readableBytes == 0, ChunkedBody.holdsHead(output) {
            // Nothing has reached the client (the head is still in this buffer): an upstream
            // failure can still be the answer's status, as OpenAI's are before a stream begins,
            // so clients see a 502 or 504 and retry by it. The buffer, head and all, is dropped.
            // (A client that stopped reading, behind an earlier pipelined answer, is not sent a
            // retryable 408 it would not read anyway: its stream ends as before.)
            answer(error)
            return
        }
        if let error {
            if blamingUpstream { logger.error("stream failed", metadata: ["error": .string(error.message)]) }
            connection?.close()
            connection = nil
        } else {
            loop.recordUpstream(streamed: true, duration: ContinuousClock.now - upstreamStarted, prompt: promptTokens, completion: completionTokens)
            if !usageSeen { passThrough.metrics?.recordStreamWithoutUsage(backend: passThrough.backendName, logger: logger) }
        }
        output.writeEventStreamEnd(error: error, requestID: requestID)
        sendStream(&output, ending: true)
        finish(draining: connection != nil)
    }

    // MARK: Answering

    private func answer(_ error: OpenAIError) {
        error.logIfServerSide(logger)
        let body = ByteBuffer(data: error.body(requestID: requestID))
        var head = ResponseHead(
            version: responseVersion, status: error.status.code, reason: error.status.reasonPhrase, capacity: Self.headCapacity(body: body))
        head.add("Content-Type", "application/json")
        for field in error.headers { head.add(field.name.rawName, field.value) }
        addCommonFields(&head)
        answer(&head, body: body)
    }

    private func answer(_ status: HTTPResponse.Status, contentType: String, cache: String, body: ByteBuffer) {
        var head = responseHead(status, contentType: contentType, cache: cache, capacity: Self.headCapacity(body: body))
        answer(&head, body: body)
    }

    /// Bodies up to this size (upstream requests and answers alike) are copied behind their
    /// head, so the message is one buffer; a larger one goes out after it in the same `writev`.
    private static let bodyCopiedBehindHead = 16 * 1024

    /// Room for a head and, when it is copied behind it, the body: the answer is built in one
    /// buffer without growing it.
    private static func headCapacity(body: ByteBuffer) -> Int {
        ResponseHead.typicalCapacity + (body.readableBytes <= bodyCopiedBehindHead ? body.readableBytes : 0)
    }

    /// A whole response: head (completed with its length here) and body. `inout`, so the head's
    /// bytes stay uniquely referenced and are written in place, never copied.
    private func answer(_ head: inout ResponseHead, body: ByteBuffer) {
        guard phase != .done, phase != .draining else { return }
        head.add("Content-Length", String(body.readableBytes))
        status = head.status
        if connection != nil {
            connection?.close()
            connection = nil
        }
        if body.readableBytes <= Self.bodyCopiedBehindHead {
            handler?.send(head.finish(appending: body), flushingWith: pool.flusher)
        } else {
            handler?.send(head.finish(), then: body, flushingWith: pool.flusher)
        }
        finish(draining: false)
    }

    private func responseHead(_ status: HTTPResponse.Status, contentType: String, cache: String, capacity: Int = ResponseHead.typicalCapacity) -> ResponseHead {
        var head = ResponseHead(version: responseVersion, status: status.code, capacity: capacity)
        head.add("Content-Type", contentType)
        head.add("X-Cache", cache)
        addCommonFields(&head)
        return head
    }

    private func addCommonFields(_ head: inout ResponseHead) {
        head.add("X-Request-ID", requestID)
        head.add("Date", loop.httpDate)
        head.add("Server", passThrough.serverName)
        if let cors = passThrough.cors { cors.responseFields(origin: self.head.headers.combinedValue("Origin")) { head.add($0, $1) } }
        if closesConnection {
            head.add("Connection", "close")
        } else if self.head.version.minor == 0 {
            head.add("Connection", "keep-alive")  // an HTTP/1.0 client assumes a close unless told
        }
    }

    /// Streams to HTTP/1.1 clients are chunked; HTTP/1.0 ones end when the connection closes.
    private var chunked: Bool { head.version.minor > 0 }

    /// HTTP/1.0 clients get 1.0 answers (their streams are not chunked but end by closing).
    private var responseVersion: HTTPVersion { head.version.minor == 0 ? .http1_0 : .http1_1 }

    /// After this answer the connection closes: the client asked (or spoke HTTP/1.0 without
    /// keep-alive, or is an HTTP/1.0 client getting a stream, which only a close can end), the
    /// gateway is shutting down, or the parser rejected what followed the request.
    private var closesConnection: Bool {
        handler?.closesAfterAnswer == true || !keepAlive || (stream && head.version.minor == 0)
    }

    /// The access line (a stream's with its time to first byte).
    private func logAccess(elapsed: Duration) {
        if let handler = passThrough.accessLogHandler {
            handler.logAccess(
                method: "POST", path: ChatPassThrough.path, status: status, latency: elapsed, firstByte: firstByte, requestID: requestID, client: remoteAddress)
        } else {
            AccessLogMiddleware.log(
                passThrough.logger, method: "POST", path: ChatPassThrough.path, status: status, elapsed: elapsed, firstByte: firstByte,
                requestID: requestID, client: remoteAddress)
        }
    }

    /// The client's response has ended (`draining`: the upstream reply is still being read).
    private func finish(draining: Bool) {
        if draining {
            // Only streams drain (after [DONE]); their silence deadline is already set.
            phase = .draining
        } else {
            cancelTimer()
            phase = .done
        }
        connection?.handler.holdReads(false)
        recordRequest()
        let handler = handler
        let closeConnection = closesConnection  // asks the handler, so before letting go of it
        self.handler = nil  // the handler holds this exchange until now: the cycle ends here
        handler?.exchangeFinished(self, closeConnection: closeConnection)
    }

    private var recorded = false

    /// The request's accounting, once, when its answer has been written whole (a stream at its
    /// end) or its client has left: the access line and the metrics.
    private func recordRequest() {
        guard !recorded else { return }
        recorded = true
        let elapsed = ContinuousClock.now - started
        logAccess(elapsed: elapsed)
        passThrough.metrics?.inFlight.decrement()
        pool.flusher.exchangeEnded()
        loop.recordRequest(status: status, duration: elapsed, firstByte: firstByte)
    }

    // MARK: The client connection

    func clientWritabilityChanged(_ writable: Bool) {
        connection?.handler.holdReads(!writable)
        // The upstream's silence counts only while the gateway reads it.
        if writable, stream { lastUpstreamRead = .now() }
    }

    /// Whether the answer is being streamed: its head has gone to the client. (The upstream's
    /// head alone is not enough: the client's waits for the first events, to share their write.)
    var isStreaming: Bool { phase == .streaming && !streamHeadPending }

    /// The client shut down its sending side before its answer began: it has gone (see
    /// ClientDeparture). The upstream call is abandoned and the answer is the 499, as the
    /// router's is (a client that only half-closed can still read it).
    func clientLeft() {
        guard phase == .reading || phase == .waiting || phase == .collecting || (phase == .streaming && streamHeadPending) else { return }
        cancelTimer()
        body = ByteBuffer()
        answer(.clientClosedRequest)
    }

    /// The gateway's shutdown has run out of `shutdown_timeout` with this answer unfinished: a
    /// 503 when the answer has not begun, else the stream ends with an error event and `[DONE]`.
    /// (Not the 499 of a client that left: this client is still there, and may retry elsewhere.)
    func serverStopping() {
        let error = OpenAIError.serverShuttingDown
        switch phase {
        case .streaming where !streamHeadPending:
            endStream(error: error, blamingUpstream: false)
        case .reading, .waiting, .collecting, .streaming:
            cancelTimer()
            body = ByteBuffer()
            answer(error)
        case .draining, .done:
            break
        }
    }

    /// The client went away: stop the upstream work (its connection cannot be reused mid-answer).
    func clientClosed() {
        handler = nil
        guard phase != .done else { return }
        cancelTimer()
        if phase != .draining {
            connection?.close()
            connection = nil
        }
        // nginx's "client closed request"; a stream cut short by its client keeps the status it began with.
        if status == 0 { status = 499 }
        phase = .done
        recordRequest()
    }
}
