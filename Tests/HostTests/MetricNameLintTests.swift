// Unit tests for the Prometheus naming conventions plugins' custom metrics must keep.
import Testing

@testable import Host

@Suite struct MetricNameLintTests {
    func problem(_ name: String, _ kind: PluginStats.CustomMetric.Kind) -> String? {
        MetricNameLint.problem("gatehouse_plugin_custom_\(name)\(kind == .counter ? "_total" : "")", kind: kind)
    }

    @Test func namesThatKeepTheConventionsPass() {
        for (name, kind) in [
            ("queue_depth", PluginStats.CustomMetric.Kind.gauge), ("payload_bytes", .gauge), ("wait_seconds", .gauge), ("build_info", .gauge),
            ("jobs", .counter), ("job_count", .counter), ("lag_sum", .counter), ("hits", .counter), ("session_minimum", .gauge),
            ("thermometers", .gauge), ("bucket_size_bytes", .gauge),
        ] {
            #expect(problem(name, kind) == nil, "\(name)")
        }
    }

    @Test func namesPromtoolRefusesAreRefusedWithTheirReason() {
        #expect(problem("x_count", .gauge)?.contains("cannot end in _count") == true)
        #expect(problem("x_bucket", .gauge)?.contains("cannot end in _bucket") == true)
        #expect(problem("x_total", .gauge)?.contains("cannot end in _total") == true)
        #expect(problem("gauge_level", .gauge) == "the name cannot contain a metric type ('gauge')")
        #expect(problem("jobs_counter", .counter) == "the name cannot contain a metric type ('counter')")
        // Any type, not only the metric's own, as promtool checks.
        #expect(problem("jobs_counter", .gauge) == "the name cannot contain a metric type ('counter')")
        #expect(problem("queue_gauge", .counter) == "the name cannot contain a metric type ('gauge')")
        #expect(problem("wait_histogram", .gauge) == "the name cannot contain a metric type ('histogram')")
        #expect(problem("x_summary", .gauge) == "the name cannot contain a metric type ('summary')")
        for abbreviation in ["ms", "s", "kb", "sec", "h", "d", "m", "b"] {
            #expect(problem("latency_\(abbreviation)_max", .gauge)?.contains("abbreviated unit '\(abbreviation)'") == true, "\(abbreviation)")
        }
        #expect(problem("uptime_hours", .gauge) == "the name uses 'hours': use the base unit 'seconds'")
        #expect(problem("heap_kilobytes", .gauge) == "the name uses 'kilobytes': use the base unit 'bytes'")
        #expect(problem("wait_milliseconds", .counter) == "the name uses 'milliseconds': use the base unit 'seconds'")
    }
}
