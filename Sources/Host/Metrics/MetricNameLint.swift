// Prometheus' naming conventions for plugins' custom metrics, as `promtool check metrics` checks them.

/// The conventions `promtool check metrics` enforces on a metric's name, checked before a
/// plugin's custom metric is exported: one plugin's natural name (`queue_count`, `latency_ms`)
/// would otherwise fail the check for the whole `/metrics` page, and every lint gate on it.
enum MetricNameLint {
    /// Unit abbreviations promtool refuses as a part of a name (`latency_ms`).
    static let abbreviations: Set<String> = ["s", "ms", "us", "ns", "sec", "b", "kb", "mb", "gb", "tb", "pb", "m", "h", "d"]
    /// Units promtool knows, each with the base unit it wants instead.
    static let baseUnits: [String: String] = [
        "amperes": "amperes", "bytes": "bytes", "celsius": "celsius", "grams": "grams", "joules": "joules", "kelvin": "kelvin",
        "meters": "meters", "metres": "metres", "seconds": "seconds", "volts": "volts",
        "minutes": "seconds", "hours": "seconds", "days": "seconds", "weeks": "seconds", "kelvins": "kelvin", "fahrenheit": "celsius",
        "rankine": "celsius", "inches": "meters", "yards": "meters", "miles": "meters", "bits": "bytes", "calories": "joules",
        "pounds": "grams", "ounces": "grams",
    ]
    /// Prefixes that make a unit another than its base (`milliseconds`, `kilobytes`).
    static let unitPrefixes = [
        "pico", "nano", "micro", "milli", "centi", "deci", "deca", "hecto", "kilo", "kibi", "mega", "mibi", "giga", "gibi", "tera", "tebi",
        "peta", "pebi",
    ]

    /// Why the exported name `fullName` of a metric of `kind` breaks a convention promtool
    /// checks, in a few words; nil when it keeps them all.
    static func problem(_ fullName: String, kind: PluginStats.CustomMetric.Kind) -> String? {
        // The first part is the gateway's own prefix, never a unit or a type.
        let parts = fullName.split(separator: "_").dropFirst().map(String.init)
        if kind == .gauge, fullName.hasSuffix("_total") { return "a gauge's name cannot end in _total (Prometheus keeps that for counters)" }
        if kind == .gauge, let suffix = ["_count", "_sum", "_bucket"].first(where: fullName.hasSuffix) {
            return "a gauge's name cannot end in \(suffix) (Prometheus keeps that for histograms and summaries)"
        }
        // Any metric type's name, not only its own (promtool refuses a gauge `jobs_counter` too).
        if let type = parts.first(where: { ["counter", "gauge", "histogram", "summary"].contains($0) }) {
            return "the name cannot contain a metric type ('\(type)')"
        }
        if let abbreviation = parts.first(where: abbreviations.contains) {
            return "the name cannot contain the abbreviated unit '\(abbreviation)': spell the base unit (seconds, bytes)"
        }
        for part in parts {
            for (unit, base) in baseUnits {
                for prefix in unitPrefixes + [""] where part == prefix + unit && part != base {
                    return "the name uses '\(part)': use the base unit '\(base)'"
                }
            }
        }
        return nil
    }
}
