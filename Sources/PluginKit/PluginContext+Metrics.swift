// Custom counters and gauges a Swift plugin declares; exported on /metrics.
internal import PluginABI

/// A custom metric: `gatehouse_plugin_custom_<name>{plugin="<plugin>"}` on `/metrics`.
public struct PluginMetric: @unchecked Sendable {
    private let host: UnsafePointer<gh_host_api>
    private let metric: OpaquePointer

    init(host: UnsafePointer<gh_host_api>, metric: OpaquePointer) {
        self.host = host
        self.metric = metric
    }

    /// Adds `value` (counters: only values >= 0).
    public func add(_ value: Double) { _ = host.pointee.metric_add(metric, value) }
    /// Adds one.
    public func increment() { add(1) }
    /// Sets a gauge.
    public func set(_ value: Double) { _ = host.pointee.metric_set(metric, value) }
}

extension PluginContext {
    /// Declares a counter (name `[a-z_][a-z0-9_]*`; exported ending in `_total`, added if missing).
    /// - Throws: when the host refuses the name (its log says why: PLUGINS.md section 12 lists
    ///   the Prometheus conventions it enforces, such as base units and no type in the name).
    public func counter(_ name: String, help: String) throws -> PluginMetric {
        try declare(GH_METRIC_COUNTER, name, help)
    }

    /// Declares a gauge (name `[a-z_][a-z0-9_]*`, not ending in `_total`, which marks a counter,
    /// nor in `_count`, `_sum` or `_bucket`, which mark histograms and summaries).
    /// - Throws: when the host refuses the name (its log says why).
    public func gauge(_ name: String, help: String) throws -> PluginMetric {
        try declare(GH_METRIC_GAUGE, name, help)
    }

    private func declare(_ kind: gh_metric_kind, _ name: String, _ help: String) throws -> PluginMetric {
        guard hostOffers(MemoryLayout<gh_host_api>.offset(of: \gh_host_api.metric_declare)!) else {
            throw PluginKitError(description: "this host speaks ABI 1.0, which has no custom metrics")
        }
        var name = name
        var help = help
        let metric = name.withUTF8 { n in
            help.withUTF8 { h in
                host.pointee.metric_declare(plugin, kind, gh_bytes(data: n.baseAddress, len: n.count), gh_bytes(data: h.baseAddress, len: h.count))
            }
        }
        guard let metric else { throw PluginKitError(description: "the host refused metric \(name) (see the host's log for why)") }
        return PluginMetric(host: host, metric: metric)
    }
}
