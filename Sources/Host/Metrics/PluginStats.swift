// Per-plugin measurements: requests, errors, latency, in-flight, LLM calls and tokens, tool calls,
// middleware, loads; exported to Prometheus and summarised as JSON for the admin API.
internal import Foundation
internal import Prometheus
internal import Synchronization

/// The measurements of one plugin, kept across its versions (reloads keep counting).
public final class PluginStats: Sendable {
    public let plugin: String
    private let registry: PrometheusCollectorRegistry

    private struct Totals {
        var requests = 0
        var errors = 0
        var inFlight = 0
        var latencySum = 0.0
        var latencyMax = 0.0
        var llmCalls = 0
        var llmErrors = 0
        var tokensIn = 0
        var tokensOut = 0
        var toolCalls = 0
        var middlewareInvocations = 0
        var middlewareShortCircuits = 0
        var loads = 0
        var reloads = 0
        var failures = 0
    }

    private let totals = Mutex(Totals())
    private let statusCounters = Mutex<[Int: Counter]>([:])
    private let errorsCounter: Counter
    private let latency: DurationHistogram
    private let inFlightGauge: Gauge
    private let llmCallsCounter: Counter
    private let llmErrorsCounter: Counter
    private let tokensInCounter: Counter
    private let tokensOutCounter: Counter
    private let toolCallsCounter: Counter
    private let middlewareCounter: Counter
    private let shortCircuitCounter: Counter
    private let loadsCounter: Counter
    private let reloadsCounter: Counter
    private let failuresCounter: Counter
    private let custom = Mutex<[String: CustomMetric]>([:])
    /// Custom metrics removed with a failed version, kept alive: the plugin was handed unretained
    /// pointers to them, and a thread it left running may still use one.
    private let retired = Mutex<[CustomMetric]>([])

    init(plugin: String, registry: PrometheusCollectorRegistry) {
        self.plugin = plugin
        self.registry = registry
        let label = [("plugin", plugin)]
        errorsCounter = registry.counter(name: "gatehouse_plugin_errors_total", labels: label, help: "Plugin requests that ended in a 5xx, a timeout, or a stream the plugin ended as failed.")
        latency = registry.histogram(name: "gatehouse_plugin_request_duration_seconds", labels: label, buckets: GatehouseMetrics.latencyBuckets,
            help: "Time until a plugin answered (head of the response).")
        inFlightGauge = registry.gauge(
            name: "gatehouse_plugin_requests_in_flight", labels: label, help: "Plugin requests waiting for the plugin's answer (its head).")
        llmCallsCounter = registry.counter(name: "gatehouse_plugin_llm_calls_total", labels: label, help: "LLM calls made by the plugin.")
        llmErrorsCounter = registry.counter(name: "gatehouse_plugin_llm_errors_total", labels: label, help: "LLM calls made by the plugin that failed.")
        tokensInCounter = registry.counter(name: "gatehouse_plugin_llm_tokens_total", labels: label + [("direction", "prompt")], help: "LLM tokens used by the plugin.")
        tokensOutCounter = registry.counter(name: "gatehouse_plugin_llm_tokens_total", labels: label + [("direction", "completion")], help: "LLM tokens used by the plugin.")
        toolCallsCounter = registry.counter(name: "gatehouse_plugin_tool_calls_total", labels: label, help: "MCP tool calls made by the plugin.")
        middlewareCounter = registry.counter(name: "gatehouse_plugin_middleware_invocations_total", labels: label, help: "Calls of the plugin's middleware functions.")
        shortCircuitCounter = registry.counter(name: "gatehouse_plugin_middleware_short_circuits_total", labels: label, help: "Requests the plugin's middleware answered itself.")
        loadsCounter = registry.counter(name: "gatehouse_plugin_loads_total", labels: label, help: "Versions of the plugin loaded.")
        reloadsCounter = registry.counter(name: "gatehouse_plugin_reloads_total", labels: label, help: "Hot reloads of the plugin.")
        failuresCounter = registry.counter(name: "gatehouse_plugin_load_failures_total", labels: label, help: "Versions of the plugin refused at load.")
    }

    // MARK: Recording

    func requestStarted() {
        totals.withLock { $0.inFlight += 1 }
        inFlightGauge.increment()
    }

    /// Counts a finished plugin request; 5xx statuses (including timeouts) count as errors.
    func requestFinished(status: Int, duration: Duration) {
        let seconds = duration.inSeconds
        totals.withLock { totals in
            totals.inFlight -= 1
            totals.requests += 1
            if status >= 500 { totals.errors += 1 }
            totals.latencySum += seconds
            totals.latencyMax = max(totals.latencyMax, seconds)
        }
        inFlightGauge.decrement()
        statusCounter(status).increment()
        if status >= 500 { errorsCounter.increment() }
        latency.record(duration)
    }

    /// Counts a streamed answer the plugin ended as failed (`respond_abort`) as an error: its
    /// status (sent with the head) was a success.
    func streamAborted() {
        totals.withLock { $0.errors += 1 }
        errorsCounter.increment()
    }

    private func statusCounter(_ status: Int) -> Counter {
        statusCounters.withLock { counters in
            if let counter = counters[status] { return counter }
            let counter = registry.counter(name: "gatehouse_plugin_requests_total", labels: [("plugin", plugin), ("status", String(status))],
                help: "Requests routed to the plugin, by status.")
            counters[status] = counter
            return counter
        }
    }

    func llmCall(succeeded: Bool, promptTokens: Int, completionTokens: Int) {
        totals.withLock { totals in
            totals.llmCalls += 1
            if !succeeded { totals.llmErrors += 1 }
            totals.tokensIn += promptTokens
            totals.tokensOut += completionTokens
        }
        llmCallsCounter.increment()
        if !succeeded { llmErrorsCounter.increment() }
        if promptTokens > 0 { tokensInCounter.increment(by: Int64(promptTokens)) }
        if completionTokens > 0 { tokensOutCounter.increment(by: Int64(completionTokens)) }
    }

    /// Counts one MCP tool call made for the plugin (wired up by the MCP tool manager).
    func toolCall() {
        totals.withLock { $0.toolCalls += 1 }
        toolCallsCounter.increment()
    }

    func middlewareInvoked(shortCircuited: Bool) {
        totals.withLock { totals in
            totals.middlewareInvocations += 1
            if shortCircuited { totals.middlewareShortCircuits += 1 }
        }
        middlewareCounter.increment()
        if shortCircuited { shortCircuitCounter.increment() }
    }

    func loaded(isReload: Bool) {
        totals.withLock { totals in
            totals.loads += 1
            if isReload { totals.reloads += 1 }
        }
        loadsCounter.increment()
        if isReload { reloadsCounter.increment() }
    }

    func loadFailed() {
        totals.withLock { $0.failures += 1 }
        failuresCounter.increment()
    }

    // MARK: Custom metrics

    /// A metric a plugin declared. Counters only go up.
    final class CustomMetric: Sendable {
        let kind: Kind
        let name: String
        let counter: Counter?
        let gauge: Gauge?
        let value = Mutex(0.0)

        enum Kind: String, Sendable {
            case counter, gauge
        }

        init(kind: Kind, name: String, counter: Counter?, gauge: Gauge?) {
            self.kind = kind
            self.name = name
            self.counter = counter
            self.gauge = gauge
        }

        func add(_ amount: Double) -> Bool {
            guard amount.isFinite, kind == .gauge || amount >= 0 else { return false }
            // A sum past Double's range (two adds of 1e308) is refused as a non-finite amount is:
            // an infinite value broke the plugin's JSON status (500) and means nothing in a scrape.
            let added = value.withLock { total in
                guard (total + amount).isFinite else { return false }
                total += amount
                return true
            }
            guard added else { return false }
            counter?.increment(by: amount)
            gauge?.increment(by: amount)
            return true
        }

        func set(_ amount: Double) -> Bool {
            guard kind == .gauge, amount.isFinite else { return false }
            value.withLock { $0 = amount }
            gauge?.set(to: amount)
            return true
        }
    }

    /// Why a custom metric was refused, in one line.
    struct Refusal: Error, CustomStringConvertible {
        let description: String
    }

    /// Declares (or returns the already declared) custom metric `name`.
    /// - Parameter catalog: the process-wide kinds and help texts of custom metric names.
    ///   Prometheus requires one type and one help text per metric name across all plugins.
    /// - Throws: `Refusal` for a name that is not one (a-z, 0-9 and _), one that breaks a
    ///   convention `promtool check metrics` enforces (see `MetricNameLint`), or one this plugin
    ///   declared with the other kind.
    func declare(kind: CustomMetric.Kind, name: String, help: String, catalog: CustomMetricCatalog) throws(Refusal) -> CustomMetric {
        guard Self.isValidMetricName(name) else {
            throw Refusal(description: "the name must be 1 to 100 of a-z, 0-9 and _, not starting with a digit")
        }
        // A counter's name ends in `_total` (added when missing), and only a counter's does.
        let isTotal = name.hasSuffix("_total")
        let fullName = "gatehouse_plugin_custom_\(name)\(kind == .counter && !isTotal ? "_total" : "")"
        if let problem = MetricNameLint.problem(fullName, kind: kind) { throw Refusal(description: problem) }
        guard let helpText = catalog.claim(fullName, kind: kind, help: help.isEmpty ? "Custom metric \(name) of a plugin." : help) else {
            throw Refusal(description: "\(fullName) is already declared with the other kind")
        }
        let declared: CustomMetric? = custom.withLock { metrics in
            if let existing = metrics[name] { return existing.kind == kind ? existing : nil }
            // `hits` and `hits_total` are one exported counter (and one series): the second name
            // gets the first's metric, or the two would add into one series behind two handles.
            if kind == .counter, let twin = metrics[isTotal ? String(name.dropLast("_total".count)) : name + "_total"], twin.kind == .counter {
                return twin
            }
            let metric =
                switch kind {
                case .counter:
                    CustomMetric(
                        kind: kind, name: name,
                        counter: registry.counter(name: fullName, labels: [("plugin", plugin)], help: helpText), gauge: nil)
                case .gauge:
                    CustomMetric(kind: kind, name: name, counter: nil, gauge: registry.gauge(name: fullName, labels: [("plugin", plugin)], help: helpText))
                }
            metrics[name] = metric
            return metric
        }
        guard let declared else { throw Refusal(description: "this plugin declared it as a \(kind == .counter ? "gauge" : "counter") already") }
        return declared
    }

    /// The names of the custom metrics declared so far.
    func customMetricNames() -> Set<String> { custom.withLock { Set($0.keys) } }

    /// Removes the custom metrics declared since `kept` was taken, from `/metrics` and the JSON
    /// summary: those of a version whose `init` failed, which must not be shown as live values.
    func removeCustomMetrics(except kept: Set<String>) {
        let dropped = custom.withLock { metrics in
            let names = metrics.keys.filter { !kept.contains($0) }
            return names.compactMap { metrics.removeValue(forKey: $0) }
        }
        for metric in dropped {
            if let counter = metric.counter { registry.unregisterCounter(counter) }
            if let gauge = metric.gauge { registry.unregisterGauge(gauge) }
        }
        retired.withLock { $0.append(contentsOf: dropped) }
    }

    static func isValidMetricName(_ name: String) -> Bool {
        guard let first = name.unicodeScalars.first, name.unicodeScalars.count <= 100 else { return false }
        func lower(_ c: Unicode.Scalar) -> Bool { ("a"..."z").contains(c) || c == "_" }
        return lower(first) && name.unicodeScalars.allSatisfy { lower($0) || ("0"..."9").contains($0) }
    }

    // MARK: Summary

    /// The JSON summary shown by `GET /v1/plugins/<name>`.
    func summary() -> [String: Any] {
        let totals = totals.withLock { $0 }
        let customValues = custom.withLock { metrics in
            metrics.mapValues { metric in ["kind": metric.kind.rawValue, "value": metric.value.withLock { $0 }] as [String: Any] }
        }
        return [
            "requests": totals.requests, "errors": totals.errors, "in_flight": totals.inFlight,
            "latency_ms": [
                "mean": totals.requests == 0 ? 0 : (totals.latencySum / Double(totals.requests) * 1000 * 1000).rounded() / 1000,
                "max": (totals.latencyMax * 1000 * 1000).rounded() / 1000,
            ],
            "llm_calls": totals.llmCalls, "llm_errors": totals.llmErrors,
            "llm_tokens": ["prompt": totals.tokensIn, "completion": totals.tokensOut],
            "tool_calls": totals.toolCalls,
            "middleware": ["invocations": totals.middlewareInvocations, "short_circuits": totals.middlewareShortCircuits],
            "loads": totals.loads, "reloads": totals.reloads, "load_failures": totals.failures,
            "custom": customValues,
        ]
    }
}

/// One kind and one help text per custom metric name, across every plugin.
final class CustomMetricCatalog: Sendable {
    private let entries = Mutex<[String: (kind: PluginStats.CustomMetric.Kind, help: String)]>([:])

    /// The help text to use for `name`, or nil when it is already declared with another kind.
    func claim(_ name: String, kind: PluginStats.CustomMetric.Kind, help: String) -> String? {
        entries.withLock { entries in
            if let existing = entries[name] { return existing.kind == kind ? existing.help : nil }
            entries[name] = (kind, help)
            return help
        }
    }
}
