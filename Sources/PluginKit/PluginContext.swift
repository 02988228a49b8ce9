// Host services as seen from a Swift plugin: configuration and structured logging.
internal import PluginABI

/// Host services for a plugin. The context passed to `init` is plugin-wide; the one passed to
/// `handle` is additionally scoped to that request (its log lines carry the request id).
///
/// A request-scoped context is valid only until `handle` returns (or its response stream
/// ends); do not keep it in tasks that outlive the request.
public struct PluginContext: @unchecked Sendable {
    let host: UnsafePointer<gh_host_api>
    let plugin: OpaquePointer
    let exchange: OpaquePointer?

    /// The plugin's effective configuration: manifest defaults < gatehouse.yaml < environment.
    public let config: PluginConfig

    init(host: UnsafePointer<gh_host_api>, plugin: OpaquePointer, exchange: OpaquePointer?, config: PluginConfig) {
        self.host = host
        self.plugin = plugin
        self.exchange = exchange
        self.config = config
    }

    func scoped(to exchange: OpaquePointer) -> PluginContext {
        PluginContext(host: host, plugin: plugin, exchange: exchange, config: config)
    }

    /// Log severities, lowest first.
    public enum LogLevel: Sendable {
        case trace, debug, info, warning, error

        var abiLevel: gh_log_level {
            switch self {
            case .trace: GH_LOG_TRACE
            case .debug: GH_LOG_DEBUG
            case .info: GH_LOG_INFO
            case .warning: GH_LOG_WARNING
            case .error: GH_LOG_ERROR
            }
        }
    }

    /// Write one log line tagged with the plugin name (and the request id in a request scope).
    /// - Parameters:
    ///   - level: severity.
    ///   - message: the message text.
    ///   - fields: structured key/value pairs added to the line.
    public func log(_ level: LogLevel, _ message: String, _ fields: [String: String] = [:]) {
        var message = message
        let pairs = fields.sorted { $0.key < $1.key }.map { (name: $0.key, value: $0.value) }
        withHeaderArray(pairs) { headers, count in
            message.withUTF8 { text in
                host.pointee.log(plugin, exchange, level.abiLevel, gh_bytes(data: text.baseAddress, len: text.count), headers, count)
            }
        }
    }

    public func debug(_ message: String, _ fields: [String: String] = [:]) { log(.debug, message, fields) }
    public func info(_ message: String, _ fields: [String: String] = [:]) { log(.info, message, fields) }
    public func warning(_ message: String, _ fields: [String: String] = [:]) { log(.warning, message, fields) }
    public func error(_ message: String, _ fields: [String: String] = [:]) { log(.error, message, fields) }
}

/// Calls `body` with a C array of gh_header pointing into one temporary buffer.
func withHeaderArray<R>(_ pairs: [(name: String, value: String)], _ body: (UnsafePointer<gh_header>?, Int) -> R) -> R {
    if pairs.isEmpty { return body(nil, 0) }
    var arena: [UInt8] = []
    var spans: [(Int, Int, Int, Int)] = []
    spans.reserveCapacity(pairs.count)
    for pair in pairs {
        let nameStart = arena.count
        arena.append(contentsOf: pair.name.utf8)
        let valueStart = arena.count
        arena.append(contentsOf: pair.value.utf8)
        spans.append((nameStart, valueStart - nameStart, valueStart, arena.count - valueStart))
    }
    return arena.withUnsafeBufferPointer { bytes in
        let base = bytes.baseAddress
        let headers = spans.map { span in
            gh_header(
                name: gh_bytes(data: base.map { $0 + span.0 }, len: span.1),
                value: gh_bytes(data: base.map { $0 + span.2 }, len: span.3))
        }
        return headers.withUnsafeBufferPointer { body($0.baseAddress, $0.count) }
    }
}

extension String {
    /// Decodes a borrowed byte view as UTF-8 (invalid sequences are repaired).
    init(_ bytes: gh_bytes) {
        self = String(decoding: UnsafeBufferPointer(start: bytes.data, count: bytes.len), as: UTF8.self)
    }
}

extension Array where Element == UInt8 {
    init(_ bytes: gh_bytes) {
        self = bytes.len == 0 ? [] : Array(UnsafeBufferPointer(start: bytes.data, count: bytes.len))
    }
}
