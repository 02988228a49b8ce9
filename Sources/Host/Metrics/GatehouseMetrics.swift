// Prometheus metrics for the gateway and its plugins (swift-prometheus registry, swift-metrics facade).
internal import Logging
public import Prometheus
internal import Synchronization

/// Owns the Prometheus registry behind `/metrics` and the gateway-wide metrics.
///
/// Metric objects are created once per label set and cached, so the request path only
/// increments counters.
public final class GatehouseMetrics: Sendable {
    public let registry: PrometheusCollectorRegistry
    static let latencyBuckets: [Duration] = [
        .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25),
        .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2.5),
        .seconds(5), .seconds(10), .seconds(30), .seconds(60),
    ]

    private struct RouteKey: Hashable {
        let route: String
        let method: String
        let status: Int
    }

    private let requestCounters = Mutex<[RouteKey: Counter]>([:])
    private let requestDurations = Mutex<[String: DurationHistogram]>([:])
    private let upstreamDurations = Mutex<[String: DurationHistogram]>([:])
    private let firstByteDurations = Mutex<[String: DurationHistogram]>([:])
    private let streamsWithoutUsage = Mutex<[String: Counter]>([:])
    private let streamWithoutUsageSeen = Atomic<Bool>(false)
    let cacheHits: Counter
    let cacheMisses: Counter
    let cacheSkips: Counter
    let tokensIn: Counter
    let tokensOut: Counter
    let inFlight: Gauge
    let clientConnections: Gauge
    let clientConnectionLimit: Gauge
    let connectionLimitWaits: Counter
    let acceptPauses: Counter

    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        cacheHits = registry.counter(name: "gatehouse_cache_hits_total", help: "Chat completions answered from the response cache.")
        cacheMisses = registry.counter(name: "gatehouse_cache_misses_total", help: "Cacheable chat completions that went upstream.")
        cacheSkips = registry.counter(
            name: "gatehouse_cache_skipped_total", help: "Chat completions sent upstream because the client's Cache-Control said no-cache or no-store.")
        tokensIn = registry.counter(name: "gatehouse_llm_tokens_total", labels: [("direction", "prompt")], help: "LLM tokens reported by the upstream.")
        tokensOut = registry.counter(name: "gatehouse_llm_tokens_total", labels: [("direction", "completion")], help: "LLM tokens reported by the upstream.")
        inFlight = registry.gauge(name: "gatehouse_http_requests_in_flight", help: "HTTP requests being served.")
        clientConnections = registry.gauge(name: "gatehouse_client_connections", help: "Client connections open.")
        clientConnectionLimit = registry.gauge(
            name: "gatehouse_client_connections_max", help: "server.max_connections: client connections open at once, past which new ones wait (0: no limit).")
        connectionLimitWaits = registry.counter(
            name: "gatehouse_client_connection_limit_reached_total", help: "Connections accepted that took the count to server.max_connections, after which new ones wait.")
        acceptPauses = registry.counter(
            name: "gatehouse_accept_failures_total", help: "Failed accept(2) calls for want of file descriptors; after each, accepting pauses 100 ms.")
        registry.gauge(
            name: "gatehouse_build_info", labels: [("version", GatehouseVersion.release), ("plugin_abi", GatehouseVersion.pluginABI)],
            help: "Always 1; the labels say which release and plugin ABI this process runs."
        ).set(to: 1.0)
    }

    /// Counts one finished HTTP request.
    func recordRequest(route: String, method: String, status: Int, duration: Duration) {
        requestCounter(route: route, method: method, status: status).increment()
        requestDuration(route: route).record(duration)
    }

    /// Counts a request refused before it was one the router or the pass-through could read
    /// (the HTTP parser's 400s and 431s, plain HTTP on the TLS port): route "unparsed", method
    /// "unknown", since neither is known. Counted only, not timed.
    func recordUnparsed(status: Int) {
        requestCounter(route: "unparsed", method: "unknown", status: status).increment()
    }

    /// The counter of requests with this route template, method and status (created once).
    func requestCounter(route: String, method: String, status: Int) -> Counter {
        let key = RouteKey(route: route, method: method, status: status)
        return requestCounters.withLock { counters in
            if let counter = counters[key] { return counter }
            let counter = registry.counter(name: "gatehouse_http_requests_total", labels: [("route", route), ("method", method), ("status", String(status))],
                help: "HTTP requests served, by route template, method and status.")
            counters[key] = counter
            return counter
        }
    }

    /// The duration histogram of a route template (created once).
    func requestDuration(route: String) -> DurationHistogram {
        requestDurations.withLock { histograms in
            if let histogram = histograms[route] { return histogram }
            let histogram = registry.histogram(name: "gatehouse_http_request_duration_seconds", labels: [("route", route)], buckets: Self.latencyBuckets,
                help: "Time to the end of the response, by route template.")
            histograms[route] = histogram
            return histogram
        }
    }

    /// Counts a stream the upstream ended without reporting its token usage (llama.cpp's server
    /// sends none), so its tokens are not counted; the first in this process is also said in
    /// `logger` (once, not for every stream; the logger is made only then).
    func recordStreamWithoutUsage(backend: String, logger: @autoclosure () -> Logger) {
        let counter = streamsWithoutUsage.withLock { counters in
            if let counter = counters[backend] { return counter }
            let counter = registry.counter(
                name: "gatehouse_upstream_streams_without_usage_total", labels: [("backend", backend)],
                help: "Streams the upstream ended without reporting token usage: their tokens are not in gatehouse_llm_tokens_total.")
            counters[backend] = counter
            return counter
        }
        counter.increment()
        guard !streamWithoutUsageSeen.exchange(true, ordering: .relaxed) else { return }
        logger().warning(
            "the upstream ended a stream without reporting its token usage, so streamed tokens are not counted (gatehouse_upstream_streams_without_usage_total counts such streams)",
            metadata: ["backend": .string(backend)])
    }

    /// The time-to-first-byte histogram of a route template's streamed responses (created once).
    func firstByteDuration(route: String) -> DurationHistogram {
        firstByteDurations.withLock { histograms in
            if let histogram = histograms[route] { return histogram }
            let histogram = registry.histogram(
                name: "gatehouse_http_time_to_first_byte_seconds", labels: [("route", route)], buckets: Self.latencyBuckets,
                help: "Time to a streamed response's head and first events (for an LLM stream, about its time to first token), by route template.")
            histograms[route] = histogram
            return histogram
        }
    }

    /// How an upstream call ended: `error` for an error status, a timeout, a refused or broken
    /// connection or a reply that is not a whole answer (the slowest calls are often those).
    enum UpstreamOutcome: String {
        case ok, error
    }

    /// Times one upstream operation ("chat", "chat_stream", "completion", "completion_stream", "embeddings").
    func recordUpstream(backend: String, operation: String, outcome: UpstreamOutcome = .ok, duration: Duration) {
        upstreamDuration(backend: backend, operation: operation, outcome: outcome).record(duration)
    }

    /// The upstream latency histogram of a backend, operation and outcome (created once).
    func upstreamDuration(backend: String, operation: String, outcome: UpstreamOutcome = .ok) -> DurationHistogram {
        let key = "\(backend)|\(operation)|\(outcome.rawValue)"
        return upstreamDurations.withLock { histograms in
            if let histogram = histograms[key] { return histogram }
            let histogram = registry.histogram(
                name: "gatehouse_upstream_request_duration_seconds",
                labels: [("backend", backend), ("operation", operation), ("outcome", outcome.rawValue)], buckets: Self.latencyBuckets,
                help: "Upstream LLM request latency (to the last byte, or to the failure), by outcome: ok or error.")
            histograms[key] = histogram
            return histogram
        }
    }

    /// A cacheable completion that goes upstream: a miss, or a skip when its client asked so.
    func recordCacheMiss(_ use: CacheUse) {
        (use == .normal ? cacheMisses : cacheSkips).increment()
    }

    func recordTokens(prompt: Int, completion: Int) {
        if prompt > 0 { tokensIn.increment(by: Int64(prompt)) }
        if completion > 0 { tokensOut.increment(by: Int64(completion)) }
    }

    /// The Prometheus text exposition of every metric.
    public func render() -> [UInt8] {
        var output: [UInt8] = []
        output.reserveCapacity(16 * 1024)
        registry.emit(into: &output)
        return output
    }
}

extension PrometheusCollectorRegistry {
    /// A counter whose exposition carries `help` (labels may be empty).
    func counter(name: String, labels: [(String, String)] = [], help: String) -> Counter {
        makeCounter(descriptor: MetricNameDescriptor(metricName: name, unitName: "", helpText: help), labels: labels)
    }

    func gauge(name: String, labels: [(String, String)] = [], help: String) -> Gauge {
        makeGauge(descriptor: MetricNameDescriptor(metricName: name, unitName: "", helpText: help), labels: labels)
    }

    func histogram(name: String, labels: [(String, String)], buckets: [Duration], help: String) -> DurationHistogram {
        makeDurationHistogram(descriptor: MetricNameDescriptor(metricName: name, unitName: "", helpText: help), labels: labels, buckets: buckets)
    }
}
