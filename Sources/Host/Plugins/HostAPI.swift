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
                    var metadata: Logger.Metadata = [:]
                    for index in 0..<(fields == nil ? 0 : fieldCount) {
                        let field = fields![index]
                        metadata[String(field.name)] = .string(String(field.value))
                    }
                    if let exchange = ExchangeTable.shared.lookup(exchange) {
                        metadata["request_id"] = .string(exchange.requestID)
                    }
                    instance.logger.log(level: Logger.Level(level), "\(String(message))", metadata: metadata)
                },
                config_json: { plugin in
                    guard let instance = PluginInstance.from(plugin) else { return gh_bytes(data: nil, len: 0) }
                    return gh_bytes(data: UnsafePointer(instance.configJSON.baseAddress), len: instance.configJSON.count)
                },
                respond: { exchangePointer, status, headers, headerCount, body in
                    guard exchangePointer != nil, headers != nil || headerCount == 0 else { return GH_ERR_INVALID_ARGUMENT }
                    guard let exchange = ExchangeTable.shared.lookup(exchangePointer) else { return GH_ERR_STATE }
                    let copied = copyHeaders(headers, headerCount)
                    return exchange.respond(status: status, headers: copied, body: ByteBuffer(body)) ? GH_OK : GH_ERR_STATE
                },
                respond_start: { exchangePointer, status, headers, headerCount in
                    guard exchangePointer != nil, headers != nil || headerCount == 0 else { return GH_ERR_INVALID_ARGUMENT }
                    guard let exchange = ExchangeTable.shared.lookup(exchangePointer) else { return GH_ERR_STATE }
                    return exchange.start(status: status, headers: copyHeaders(headers, headerCount)) ? GH_OK : GH_ERR_STATE
                },
                respond_write: { exchangePointer, chunk in
                    guard exchangePointer != nil, chunk.data != nil || chunk.len == 0 else { return GH_ERR_INVALID_ARGUMENT }
                    guard let exchange = ExchangeTable.shared.lookup(exchangePointer) else { return GH_ERR_STATE }
                    return exchange.write(ByteBuffer(chunk)) ? GH_OK : GH_ERR_STATE
                },
                respond_finish: { exchangePointer in
                    guard exchangePointer != nil else { return GH_ERR_INVALID_ARGUMENT }
                    guard let exchange = ExchangeTable.shared.lookup(exchangePointer) else { return GH_ERR_STATE }
                    return exchange.finish() ? GH_OK : GH_ERR_STATE
                }))
        return UnsafePointer(table)
    }()
}

private func copyHeaders(_ headers: UnsafePointer<gh_header>?, _ count: Int) -> [(String, String)] {
    guard let headers, count > 0 else { return [] }
    return (0..<count).map { (String(headers[$0].name), String(headers[$0].value)) }
}

extension String {
    /// Copies a borrowed byte view as UTF-8 (invalid sequences are repaired).
    init(_ bytes: gh_bytes) {
        self = bytes.len == 0 ? "" : String(decoding: UnsafeRawBufferPointer(start: bytes.data, count: bytes.len), as: UTF8.self)
    }
}

extension ByteBuffer {
    /// Copies a borrowed byte view.
    init(_ bytes: gh_bytes) {
        self = bytes.len == 0 ? ByteBuffer() : ByteBuffer(bytes: UnsafeRawBufferPointer(start: bytes.data, count: bytes.len))
    }
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
