// The OpenAI-compatible surface: chat and text completions (JSON and SSE), models, embeddings, readiness.
internal import Foundation
internal import HTTPTypes
internal import Hummingbird
internal import Logging
internal import NIOCore

/// Registers `/v1/chat/completions`, `/v1/completions`, `/v1/models` (and `/v1/models/<id>`), `/v1/embeddings` and `/health/ready`.
struct GatewayRoutes {
    let chat: ChatService
    let maxBodyBytes: Int
    /// An API key guards the API: `/health/ready`, which needs none, tells only the kind of an
    /// upstream failure, not the upstream's address or words.
    var hidesUpstreamDetails = false

    static let cacheHeader = HTTPField.Name("X-Cache")!

    func register(on router: Router<GatehouseRequestContext>) {
        router.post("/v1/chat/completions") { request, context in
            let body = try await request.body.collect(upTo: maxBodyBytes)
            let chatRequest = try ChatRequest.parse(body)
            let requestID = context.requestID
            // A client that leaves while the upstream works (an SDK's timeout, a stopped
            // generation) gets the upstream call abandoned: until the stream's first byte, or
            // the whole answer.
            let departure = await ClientDeparture.of(context.channel)
            if chatRequest.stream {
                let events = try await departure.untilClientLeaves { try await chat.stream(chatRequest, requestID: requestID) }
                return streamResponse(events, first: try await Self.firstWrite(of: events, departure: departure), departure: departure, context: context)
            }
            let cacheUse = CacheUse(cacheControl: request.headers[.cacheControl])
            let (completion, outcome) = try await departure.untilClientLeaves {
                try await chat.complete(chatRequest, requestID: requestID, cacheUse: cacheUse)
            }
            return Response(
                status: .ok,
                headers: [.contentType: "application/json", Self.cacheHeader: outcome.rawValue],
                body: .init(byteBuffer: ByteBuffer(data: completion.json)))
        }
        router.post("/v1/completions") { request, context in
            let completionRequest = try TextCompletionRequest.parse(try await request.body.collect(upTo: maxBodyBytes))
            let requestID = context.requestID
            let departure = await ClientDeparture.of(context.channel)
            if completionRequest.stream {
                let events = try await departure.untilClientLeaves { try await chat.textStream(completionRequest, requestID: requestID) }
                return streamResponse(events, first: try await Self.firstWrite(of: events, departure: departure), departure: departure, context: context)
            }
            let completion = try await departure.untilClientLeaves { try await chat.textComplete(completionRequest, requestID: requestID) }
            return Response(
                status: .ok, headers: [.contentType: "application/json", Self.cacheHeader: "BYPASS"], body: .init(byteBuffer: ByteBuffer(data: completion.json)))
        }
        router.get("/v1/models") { _, context in
            Response.json(try await chat.backend.models(requestID: context.requestID))
        }
        router.get("/v1/models/**") { request, context in
            // Model ids may hold slashes and colons (hf.co/org/repo:Q4_K_M): all of the rest of the path.
            let rawID = request.uri.path.dropFirst("/v1/models/".count)
            let id = rawID.removingPercentEncoding ?? String(rawID)
            let list = try await chat.backend.models(requestID: context.requestID)
            let models = ((try? JSONSerialization.jsonObject(with: list)) as? [String: Any])?["data"] as? [[String: Any]] ?? []
            // Ollama takes a name without a tag for its `:latest` (as in chat requests).
            let latest = chat.backend.name == "ollama" && !(id.split(separator: "/").last ?? "").contains(":") ? id + ":latest" : nil
            guard let model = models.first(where: { $0["id"] as? String == id }) ?? models.first(where: { latest != nil && $0["id"] as? String == latest })
            else {
                throw OpenAIError(.notFound, "the model '\(id)' does not exist", type: "invalid_request_error", code: "model_not_found")
            }
            return try Response.json(object: model)
        }
        router.post("/v1/embeddings") { request, context in
            let body = try await request.body.collect(upTo: maxBodyBytes)
            guard let object = try? JSONSerialization.jsonObject(with: Data(body.readableBytesView)) as? [String: Any] else {
                throw OpenAIError(.badRequest, "request body must be a JSON object", code: "invalid_json")
            }
            guard object["model"] is String else { throw RequestFields.missing("model") }
            guard object["input"] != nil else { throw RequestFields.missing("input") }
            let requestID = context.requestID
            // A large batch takes a while: abandoned too when the client leaves.
            let departure = await ClientDeparture.of(context.channel)
            return Response.json(try await departure.untilClientLeaves { try await chat.embeddings(object, requestID: requestID) })
        }
        let readiness = ReadinessProbe(backend: chat.backend)
        router.get("/health/ready") { _, context in
            do {
                try await readiness.check(requestID: context.requestID, logger: context.logger).get()
                return try Response.json(object: ["status": "ready", "backend": chat.backend.name])
            } catch {
                // The probe needs no key: when one guards the rest, it tells anyone who asks only
                // what kind of failure it is, not the upstream's address (a refused connection's
                // URL, a failed lookup's host and port) nor the upstream's own words (an error
                // quoting part of a key). The log has the whole reason, as do the API's own
                // errors, behind the key.
                let reason = hidesUpstreamDetails ? Self.publicReason(for: error) : Self.reason(for: error)
                return try Response.json(object: ["status": "unavailable", "backend": chat.backend.name, "reason": reason], status: .serviceUnavailable)
            }
        }
    }

    /// Why the upstream is not ready, in full (its URL, and its own words, included).
    static func reason(for error: any Error) -> String {
        (error as? OpenAIError)?.message ?? String(describing: error)
    }

    /// Why the upstream is not ready, told by the kind of failure alone.
    static func publicReason(for error: any Error) -> String {
        let kind =
            switch (error as? OpenAIError)?.code {
            case "upstream_unreachable": "upstream unreachable"
            case "upstream_timeout": "upstream did not answer in time"
            case "upstream_auth": "upstream refused the gateway's credentials"
            case "upstream_busy": "every upstream connection is in use"
            default: "upstream failed"
            }
        return kind + " (the gateway's log has the details)"
    }

    /// How a stream's first write goes: its first chunk, or its end with none.
    enum FirstWrite: Sendable {
        case chunk(Data)
        case ended
    }

    /// Reads `events` up to the first chunk to write. An upstream may send its head long before
    /// its first event (llama.cpp's and vLLM's servers do, then queue or read the prompt), and
    /// once the route has answered, only a write notices that the client has gone: this wait is
    /// the one run until the client leaves, abandoning the upstream call (later, each token's
    /// write notices). A failure is thrown, to be answered as the request's error: nothing has
    /// been sent yet, so clients see its status (502, 504…) and can retry by it.
    static func firstWrite(of events: AsyncThrowingStream<ChatStreamEvent, any Error>, departure: ClientDeparture) async throws -> FirstWrite {
        do {
            return try await departure.untilClientLeaves {
                // The same pull-driven stream continues later in the response body (EventPump:
                // one task at a time, each pulling the next element).
                for try await event in events {
                    if case .chunk(let data) = event { return .chunk(data) }
                }
                return .ended
            }
        } catch {
            // Cancelled because the client left (or the server stopped it): its 499 (503), not the stream's error.
            if let abandonment = departure.abandonment { throw abandonment }
            throw error
        }
    }

    /// Server-sent events: one `data:` line per chunk, then `data: [DONE]`. Upstream failures
    /// before the first chunk are ordinary error responses (`firstWrite` throws them); a failure
    /// mid-stream becomes an `error` event, as OpenAI's API does. A client that leaves mid-stream
    /// (closes, or shuts its sending side: `departure`) ends it at the next event, without
    /// `[DONE]`, and the upstream call is abandoned with the events, as on the pass-through:
    /// a write to a client that only half-closed succeeds, so writing alone would not notice.
    private func streamResponse(
        _ events: AsyncThrowingStream<ChatStreamEvent, any Error>, first: FirstWrite, departure: ClientDeparture, context: GatehouseRequestContext
    ) -> Response {
        let requestID = context.requestID
        let logger = context.logger
        let body = ResponseBody { writer in
            var buffer = ByteBuffer()
            func write(_ payload: some Collection<UInt8>) async throws {
                buffer.clear()
                buffer.writeStaticString("data: ")
                buffer.writeBytes(payload)
                buffer.writeStaticString("\n\n")
                try await writer.write(buffer)
            }
            do {
                switch first {
                case .chunk(let data):
                    try await write(data)
                    for try await event in events {
                        if departure.departure == .clientLeft { throw ClientLeftMidStream() }
                        if case .chunk(let data) = event { try await write(data) }
                    }
                case .ended: break
                }
            } catch let error as OpenAIError {
                logger.error("stream failed", metadata: ["error": .string(error.message)])
                try await write(error.body(requestID: requestID))
            }
            try await writer.write(ByteBuffer(staticString: "data: [DONE]\n\n"))
            try await writer.finish(nil)
        }
        return Response(
            status: .ok,
            headers: [.contentType: "text/event-stream", .cacheControl: "no-cache", Self.cacheHeader: "BYPASS"],
            body: body)
    }
}

/// Ends a stream whose client has gone: the connection closes without the stream's end.
private struct ClientLeftMidStream: Error {}

/// The upstream readiness checks behind `/health/ready`, which needs no key and no rate: at most
/// one upstream call at a time, its verdict reused for `reuse`. Otherwise anyone could make the
/// gateway call the upstream as fast as they can ask (against a paid API's request quota too).
actor ReadinessProbe {
    let backend: any ChatBackend
    let reuse: Duration
    private var last: (at: ContinuousClock.Instant, result: Result<Void, any Error>)?
    private var running: Task<Result<Void, any Error>, Never>?

    init(backend: any ChatBackend, reuse: Duration = .seconds(1)) {
        self.backend = backend
        self.reuse = reuse
    }

    /// The upstream's readiness: a verdict younger than `reuse`, the one being reached, or a new one.
    /// A new failing verdict is logged (at most one line per `reuse`), with its whole reason.
    func check(requestID: String, logger: Logger) async -> Result<Void, any Error> {
        if let last, ContinuousClock.now - last.at < reuse { return last.result }
        if let running { return await running.value }
        let backend = backend
        let task = Task {
            do {
                try await backend.checkReady(requestID: requestID)
                return Result<Void, any Error>.success(())
            } catch {
                return .failure(error)
            }
        }
        running = task
        let result = await task.value
        running = nil
        last = (.now, result)
        if case .failure(let error) = result {
            logger.warning("upstream not ready", metadata: ["error": .string(GatewayRoutes.reason(for: error))])
        }
        return result
    }
}
