// The chat pipeline shared by /v1/chat/completions and plugins' LLM calls: cache, then backend.
internal import Foundation
internal import Logging

/// Runs chat completions against the configured backend, through the response cache.
/// Every caller — HTTP clients and plugins alike — goes through here, so caching, request-id
/// propagation and timeouts behave the same for all of them.
final class ChatService: Sendable {
    let backend: any ChatBackend
    let cache: ResponseCache?
    let metrics: GatehouseMetrics?

    init(backend: any ChatBackend, cache: ResponseCache?, metrics: GatehouseMetrics?) {
        self.backend = backend
        self.cache = cache
        self.metrics = metrics
    }

    /// Builds the backend named in `config` over a shared upstream client.
    convenience init(config: GatehouseConfig, client: UpstreamClient, metrics: GatehouseMetrics?) {
        let backend: any ChatBackend =
            switch config.upstream.backend {
            case .ollama: OllamaBackend(client: client)
            case .openai: OpenAIBackend(client: client, apiPath: config.upstream.openAIAPIPath)
            }
        let cache = config.cache.enabled
            ? ResponseCache(limits: .init(maxEntries: config.cache.maxEntries, maxBytes: config.cache.maxBytes, ttl: config.cache.ttl))
            : nil
        self.init(backend: backend, cache: cache, metrics: metrics)
    }

    /// A non-streaming completion, through the cache as `cacheUse` allows; the outcome says
    /// whether the upstream was skipped (`.hit`).
    func complete(_ request: ChatRequest, requestID: String, cacheUse: CacheUse = .normal) async throws -> (completion: ChatCompletion, cache: CacheOutcome) {
        let key = cache.map { _ in request.cacheKey(backend: backend.name) }
        if let key, cacheUse == .normal, let cached = cache?.get(key) {
            metrics?.cacheHits.increment()
            return (cached, .hit)
        }
        if key != nil { metrics?.recordCacheMiss(cacheUse) }
        let completion = try await timed("chat") { try await backend.complete(request, requestID: requestID) }
        metrics?.recordTokens(prompt: completion.promptTokens, completion: completion.completionTokens)
        guard let key, let stored = cacheUse.storedOutcome else { return (completion, .bypass) }
        cache?.put(key, completion)
        return (completion, stored)
    }

    /// A streamed completion; token counts and the upstream time are recorded when it ends.
    func stream(_ request: ChatRequest, requestID: String) async throws -> AsyncThrowingStream<ChatStreamEvent, any Error> {
        let started = ContinuousClock.now
        let events = try await timed("chat_stream", onlyFailures: true) { try await backend.stream(request, requestID: requestID) }
        return measured(events, operation: "chat_stream", started: started, requestID: requestID)
    }

    /// A legacy text completion (`/v1/completions`). Not cached: it serves code completion,
    /// where the same prompt rarely comes twice.
    func textComplete(_ request: TextCompletionRequest, requestID: String) async throws -> ChatCompletion {
        let completion = try await timed("completion") { try await backend.textCompletion(request, requestID: requestID) }
        metrics?.recordTokens(prompt: completion.promptTokens, completion: completion.completionTokens)
        return completion
    }

    /// Embeddings (`/v1/embeddings`), timed as operation "embeddings"; their input tokens
    /// (`usage.prompt_tokens`) count as prompt tokens.
    func embeddings(_ body: [String: Any], requestID: String) async throws -> Data {
        let reply = try await timed("embeddings") { try await backend.embeddings(body, requestID: requestID) }
        metrics?.recordTokens(prompt: JSONScan.integer(after: "prompt_tokens", in: reply) ?? 0, completion: 0)
        return reply
    }

    /// A streamed legacy text completion, measured as chat streams are.
    func textStream(_ request: TextCompletionRequest, requestID: String) async throws -> AsyncThrowingStream<ChatStreamEvent, any Error> {
        let started = ContinuousClock.now
        let events = try await timed("completion_stream", onlyFailures: true) { try await backend.textCompletionStream(request, requestID: requestID) }
        return measured(events, operation: "completion_stream", started: started, requestID: requestID)
    }

    /// Runs one upstream operation and times it by outcome (`onlyFailures`: a stream's opening,
    /// whose success is timed when the stream ends). Not the upstream's outcome, so not recorded:
    /// a request refused before anything was sent (it cannot be translated), and a call abandoned
    /// because its client left (cancellation).
    private func timed<T>(_ operation: String, onlyFailures: Bool = false, _ call: () async throws -> T) async throws -> T {
        let started = ContinuousClock.now
        let attempt = UpstreamAttempt()
        do {
            let result = try await UpstreamAttempt.$current.withValue(attempt) { try await call() }
            if !onlyFailures { metrics?.recordUpstream(backend: backend.name, operation: operation, duration: ContinuousClock.now - started) }
            return result
        } catch {
            if attempt.hasSent, !Task.isCancelled, !(error is CancellationError) {
                metrics?.recordUpstream(backend: backend.name, operation: operation, outcome: .error, duration: ContinuousClock.now - started)
            }
            throw error
        }
    }

    /// `events`, recording the upstream time and the token counts when it ends: the last usage
    /// seen, as the pass-through and plugins take it, since some upstreams report running
    /// totals on every chunk (vLLM's `continuous_usage_stats`), which summed would overcount.
    private func measured(
        _ events: AsyncThrowingStream<ChatStreamEvent, any Error>, operation: String, started: ContinuousClock.Instant, requestID: String
    ) -> AsyncThrowingStream<ChatStreamEvent, any Error> {
        guard let metrics else { return events }
        let backendName = backend.name
        let usage = UsageSeen()
        return EventPump(
            events.makeAsyncIterator(), mapError: { $0 },
            onFailure: { error in
                guard !(error is CancellationError) else { return }
                metrics.recordUpstream(backend: backendName, operation: operation, outcome: .error, duration: ContinuousClock.now - started)
            },
            onFinish: {
                metrics.recordUpstream(backend: backendName, operation: operation, duration: ContinuousClock.now - started)
                if let (prompt, completion) = usage.last {
                    metrics.recordTokens(prompt: prompt, completion: completion)
                } else {
                    metrics.recordStreamWithoutUsage(backend: backendName, logger: {
                        var logger = Logger(label: "gatehouse")
                        logger[metadataKey: "request_id"] = .string(requestID)
                        return logger
                    }())
                }
            },
            endedEarly: { _ in nil }  // the backend's own pump has judged the ending
        ) { event in
            if case .usage(let prompt, let completion) = event { usage.last = (prompt, completion) }
            return ([event], false)
        }.stream
    }
}

/// The last usage a stream reported. The pump calls its transform and its end on the consuming
/// task, one after the other, never at once.
private final class UsageSeen: @unchecked Sendable {
    var last: (prompt: Int, completion: Int)?
}
