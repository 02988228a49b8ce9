// The chat pipeline shared by /v1/chat/completions and plugins' LLM calls: cache, then backend.
internal import Foundation

/// Runs chat completions against the configured backend, through the response cache.
/// Every caller — HTTP clients and plugins alike — goes through here, so caching, request-id
/// propagation and timeouts behave the same for all of them.
final class ChatService: Sendable {
    let backend: any ChatBackend
    let cache: ResponseCache?

    init(backend: any ChatBackend, cache: ResponseCache?) {
        self.backend = backend
        self.cache = cache
    }

    /// Builds the backend named in `config` over a shared upstream client.
    convenience init(config: GatehouseConfig, client: UpstreamClient) {
        let backend: any ChatBackend =
            switch config.upstream.backend {
            case .ollama: OllamaBackend(client: client)
            case .openai: OpenAIBackend(client: client)
            }
        let cache = config.cache.enabled
            ? ResponseCache(limits: .init(maxEntries: config.cache.maxEntries, maxBytes: config.cache.maxBytes, ttl: config.cache.ttl))
            : nil
        self.init(backend: backend, cache: cache)
    }

    /// A non-streaming completion; `cacheHit` tells whether the upstream was skipped.
    func complete(_ request: ChatRequest, requestID: String) async throws -> (completion: ChatCompletion, cacheHit: Bool) {
        let key = cache.map { _ in request.cacheKey(backend: backend.name) }
        if let key, let cached = cache?.get(key) { return (cached, true) }
        let completion = try await backend.complete(request, requestID: requestID)
        if let key { cache?.put(key, completion) }
        return (completion, false)
    }

    func stream(_ request: ChatRequest, requestID: String) async throws -> AsyncThrowingStream<ChatStreamEvent, any Error> {
        try await backend.stream(request, requestID: requestID)
    }
}
