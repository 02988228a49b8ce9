// The host-services table (`gh_host_api`) every plugin receives at init: C entry points into the host.
internal import Foundation
internal import Logging
internal import NIOCore
internal import PluginABI

/// The single, immutable services table. Its functions find the calling plugin through the
/// `gh_plugin*` (a retained PluginInstance) and the exchange through `ExchangeTable`.
enum HostAPI {
    nonisolated(unsafe) static let table: UnsafePointer<gh_host_api> = {
        let table = UnsafeMutablePointer<gh_host_api>.allocate(capacity: 1)
        table.initialize(
            to: gh_host_api(
                struct_size: UInt32(MemoryLayout<gh_host_api>.size),
                abi_major: UInt32(GATEHOUSE_ABI_MAJOR),
                abi_minor: UInt32(GATEHOUSE_ABI_MINOR),
                log: { plugin, exchange, level, message, fields, fieldCount in
                    guard let instance = PluginInstance.from(plugin) else { return }
                    guard message.isReadable, let copied = copyHeaders(fields, fieldCount) else {
                        instance.logger.warning("plugin log call refused: a NULL pointer with a non-zero length (message or field)")
                        return
                    }
                    var metadata: Logger.Metadata = [:]
                    for (name, value) in copied { metadata[name] = .string(value) }
                    // The host's keys win: a plugin's `plugin` field would mislabel the line.
                    metadata["plugin"] = nil
                    // A line logged during an exchange, or inside a middleware call (which has
                    // none), belongs to that request.
                    if let requestID = ExchangeTable.shared.lookup(exchange)?.requestID ?? MiddlewareCallState.requestIDOnThisThread {
                        metadata["request_id"] = .string(requestID)
                    }
                    instance.logger.log(level: Logger.Level(level), "\(String(message))", metadata: metadata)
                },
                config_json: { plugin in
                    guard let instance = PluginInstance.from(plugin) else { return gh_bytes(data: nil, len: 0) }
                    return gh_bytes(data: UnsafePointer(instance.configJSON.baseAddress), len: instance.configJSON.count)
                },
                respond: { exchangePointer, status, headers, headerCount, body in
                    guard exchangePointer != nil, body.isReadable, let copied = copyHeaders(headers, headerCount) else { return GH_ERR_INVALID_ARGUMENT }
                    guard let exchange = ExchangeTable.shared.lookup(exchangePointer) else { return GH_ERR_STATE }
                    return exchange.respond(status: status, headers: copied, body: ByteBuffer(body)) ? GH_OK : GH_ERR_STATE
                },
                respond_start: { exchangePointer, status, headers, headerCount in
                    guard exchangePointer != nil, let copied = copyHeaders(headers, headerCount) else { return GH_ERR_INVALID_ARGUMENT }
                    guard let exchange = ExchangeTable.shared.lookup(exchangePointer) else { return GH_ERR_STATE }
                    return exchange.start(status: status, headers: copied) ? GH_OK : GH_ERR_STATE
                },
                respond_write: { exchangePointer, chunk in
                    guard exchangePointer != nil, chunk.isReadable else { return GH_ERR_INVALID_ARGUMENT }
                    guard let exchange = ExchangeTable.shared.lookup(exchangePointer) else { return GH_ERR_STATE }
                    return exchange.write(ByteBuffer(chunk)) ? GH_OK : GH_ERR_STATE
                },
                respond_finish: { exchangePointer in
                    guard exchangePointer != nil else { return GH_ERR_INVALID_ARGUMENT }
                    guard let exchange = ExchangeTable.shared.lookup(exchangePointer) else { return GH_ERR_STATE }
                    return exchange.finish() ? GH_OK : GH_ERR_STATE
                },
                llm_chat: { plugin, exchangePointer, requestJSON, onChunk, onDone, context in
                    guard let instance = PluginInstance.from(plugin), let onDone, requestJSON.isReadable else {
                        return GH_ERR_INVALID_ARGUMENT
                    }
                    let requestID = ExchangeTable.shared.lookup(exchangePointer)?.requestID
                        ?? "plugin-\(instance.manifest.name)-\(UUID().uuidString.lowercased())"
                    let json = requestJSON.len == 0 ? Data() : Data(bytes: requestJSON.data, count: requestJSON.len)
                    instance.llmChat(requestJSON: json, requestID: requestID, onChunk: onChunk, onDone: onDone, context: context)
                    return GH_OK
                },
                middleware_register: { plugin, spec in
                    guard let instance = PluginInstance.from(plugin) else { return GH_ERR_INVALID_ARGUMENT }
                    guard let spec else {
                        instance.logger.error("middleware refused: the spec is NULL")
                        return GH_ERR_INVALID_ARGUMENT
                    }
                    guard spec.pointee.struct_size >= UInt32(MemoryLayout<gh_middleware_spec>.size) else {
                        instance.logger.error(
                            "middleware refused: struct_size \(spec.pointee.struct_size) is smaller than this host's gh_middleware_spec (\(MemoryLayout<gh_middleware_spec>.size) bytes)")
                        return GH_ERR_INVALID_ARGUMENT
                    }
                    return instance.registerMiddleware(spec.pointee)
                },
                mw_set_header: { call, name, value in
                    guard let call, name.len > 0, name.isReadable, value.isReadable else { return GH_ERR_INVALID_ARGUMENT }
                    return MiddlewareCallState.with(call) { state in
                        state.setHeader(String(name), String(value))
                        return GH_OK
                    } ?? GH_ERR_STATE
                },
                mw_remove_header: { call, name in
                    guard let call, name.isReadable else { return GH_ERR_INVALID_ARGUMENT }
                    return MiddlewareCallState.with(call) { state in
                        state.removeHeader(String(name))
                        return GH_OK
                    } ?? GH_ERR_STATE
                },
                mw_set_body: { call, body in
                    guard let call, body.isReadable else { return GH_ERR_INVALID_ARGUMENT }
                    return MiddlewareCallState.with(call) { state in
                        guard !state.bodyIsStream else { return GH_ERR_STATE }
                        state.body = ByteBuffer(body)
                        state.removeHeader("content-length")  // the server frames the new body itself
                        return GH_OK
                    } ?? GH_ERR_STATE
                },
                mw_set_status: { call, status in
                    guard let call, PluginStatus.isFinal(status) else { return GH_ERR_INVALID_ARGUMENT }
                    return MiddlewareCallState.with(call) { state in
                        guard state.phase == .response else { return GH_ERR_STATE }
                        state.status = Int(status)
                        return GH_OK
                    } ?? GH_ERR_STATE
                },
                mw_respond: { call, status, headers, headerCount, body in
                    guard let call, PluginStatus.isFinal(status), body.isReadable, let copied = copyHeaders(headers, headerCount) else {
                        return GH_ERR_INVALID_ARGUMENT
                    }
                    return MiddlewareCallState.with(call) { state in
                        guard state.phase == .request, state.shortCircuit == nil else { return GH_ERR_STATE }
                        state.shortCircuit = (Int(status), copied, ByteBuffer(body))
                        return GH_OK
                    } ?? GH_ERR_STATE
                },
                metric_declare: { plugin, kind, name, help in
                    guard let instance = PluginInstance.from(plugin), name.isReadable, help.isReadable else { return nil }
                    let metricKind: PluginStats.CustomMetric.Kind
                    switch kind {
                    case GH_METRIC_COUNTER: metricKind = .counter
                    case GH_METRIC_GAUGE: metricKind = .gauge
                    default:
                        instance.logger.error("metric refused: kind \(kind.rawValue) is neither GH_METRIC_COUNTER nor GH_METRIC_GAUGE", metadata: ["metric": .string(String(name))])
                        return nil
                    }
                    do {
                        let metric = try instance.stats.declare(kind: metricKind, name: String(name), help: String(help), catalog: instance.services.customMetrics)
                        return OpaquePointer(Unmanaged.passUnretained(metric).toOpaque())
                    } catch {
                        instance.logger.error("metric refused: \(error)", metadata: ["metric": .string(String(name))])
                        return nil
                    }
                },
                metric_add: { metric, value in
                    guard let metric else { return GH_ERR_INVALID_ARGUMENT }
                    return Unmanaged<PluginStats.CustomMetric>.fromOpaque(UnsafeRawPointer(metric)).takeUnretainedValue().add(value)
                        ? GH_OK : GH_ERR_INVALID_ARGUMENT
                },
                metric_set: { metric, value in
                    // GH_ERR_STATE for a non-finite value too, as ABI 1.1 documents it (plugins may test it).
                    guard let metric else { return GH_ERR_INVALID_ARGUMENT }
                    return Unmanaged<PluginStats.CustomMetric>.fromOpaque(UnsafeRawPointer(metric)).takeUnretainedValue().set(value)
                        ? GH_OK : GH_ERR_STATE
                },
                respond_abort: { exchangePointer, reason in
                    guard exchangePointer != nil, reason.isReadable else { return GH_ERR_INVALID_ARGUMENT }
                    guard let exchange = ExchangeTable.shared.lookup(exchangePointer) else { return GH_ERR_STATE }
                    return exchange.abort(reason: String(reason)) ? GH_OK : GH_ERR_STATE
                }))
        return UnsafePointer(table)
    }()
}

/// Copies a plugin's header list (or log fields); nil when it cannot be read: a NULL list with
/// a count, or a name or value with a NULL pointer and a length (GH_ERR_INVALID_ARGUMENT, as
/// the ABI promises, where reading it would crash the gateway).
private func copyHeaders(_ headers: UnsafePointer<gh_header>?, _ count: Int) -> [(String, String)]? {
    guard count > 0 else { return [] }
    guard let headers else { return nil }
    var copied: [(String, String)] = []
    copied.reserveCapacity(count)
    for index in 0..<count {
        guard headers[index].name.isReadable, headers[index].value.isReadable else { return nil }
        copied.append((String(headers[index].name), String(headers[index].value)))
    }
    return copied
}

extension gh_bytes {
    /// Whether the view can be read: a NULL `data` only with `len` 0. Every entry point checks
    /// this before copying; one that did not would abort the process on a plugin's mistake.
    var isReadable: Bool { data != nil || len == 0 }
}

extension String {
    /// Copies a borrowed byte view as UTF-8 (invalid sequences are repaired); an unreadable
    /// view (see `isReadable`) is empty.
    init(_ bytes: gh_bytes) {
        self = bytes.len == 0 || bytes.data == nil ? "" : String(decoding: UnsafeRawBufferPointer(start: bytes.data, count: bytes.len), as: UTF8.self)
    }
}

extension ByteBuffer {
    /// Copies a borrowed byte view; an unreadable view (see `isReadable`) is empty.
    init(_ bytes: gh_bytes) {
        self = bytes.len == 0 || bytes.data == nil ? ByteBuffer() : ByteBuffer(bytes: UnsafeRawBufferPointer(start: bytes.data, count: bytes.len))
    }
}

/// Which status codes a plugin may answer with.
enum PluginStatus {
    /// A final status (200–599). An interim one (1xx) cannot end a request: the client would
    /// wait for the final answer, and what the plugin wrote as the body would be read as it.
    static func isFinal(_ status: UInt16) -> Bool { (200...599).contains(status) }

    /// Whether a response with `status` may carry a body. 204 and 304 have none (RFC 9110
    /// §6.4.1): a plugin's body sent with one would be read by the client as the next response.
    static func allowsBody(_ status: Int) -> Bool { status != 204 && status != 304 }
}

extension Logger.Level {
    init(_ level: gh_log_level) {
        switch level {
        case GH_LOG_TRACE: self = .trace
        case GH_LOG_DEBUG: self = .debug
        case GH_LOG_INFO: self = .info
        case GH_LOG_WARNING: self = .warning
        default: self = .error
        }
    }
}
