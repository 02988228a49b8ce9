// Turns a GatehousePlugin type into the C descriptor the host loads (the ABI's Swift side).
internal import PluginABI
internal import Dispatch
internal import Synchronization
#if canImport(Glibc)
internal import Glibc
#elseif canImport(Darwin)
internal import Darwin
#endif

/// Returns the ABI descriptor for plugin type `P`. Call it from your exported entry function:
///
/// ```swift
/// @_cdecl("gatehouse_plugin_entry_v1")
/// public func gatehousePluginEntry() -> UnsafeRawPointer { exportPlugin(EchoPlugin.self) }
/// ```
///
/// A library exports exactly one plugin type; the descriptor is built once and lives as long
/// as the library (Swift plugins are never unloaded).
public func exportPlugin<P: GatehousePlugin>(_ type: P.Type) -> UnsafeRawPointer {
    exported.withLock { state in
        if let descriptor = state.descriptor { return UnsafeRawPointer(descriptor) }
        state.type = type
        let descriptor = UnsafeMutablePointer<gh_plugin_descriptor>.allocate(capacity: 1)
        descriptor.initialize(
            to: gh_plugin_descriptor(
                struct_size: UInt32(MemoryLayout<gh_plugin_descriptor>.size),
                abi_major: UInt32(GATEHOUSE_ABI_MAJOR),
                abi_minor: UInt32(GATEHOUSE_ABI_MINOR),
                name: UnsafePointer(strdup(P.name)),
                version: UnsafePointer(strdup(P.version)),
                swift_toolchain: UnsafePointer(strdup(swiftToolchain)),
                init: initThunk,
                handle: handleThunk,
                shutdown: shutdownThunk))
        state.descriptor = descriptor
        return UnsafeRawPointer(descriptor)
    }
}

/// The Swift toolchain this code was compiled with. Swift has no stable ABI on Linux, so the
/// host refuses a plugin whose toolchain differs from its own. Extend when toolchains change.
let swiftToolchain: String = {
    #if compiler(>=6.4)
    return "swift-6.4-or-newer"
    #elseif compiler(>=6.3.1)
    return "swift-6.3.1"
    #elseif compiler(>=6.3)
    return "swift-6.3.0"
    #else
    return "swift-older-than-6.3"
    #endif
}()

private struct ExportState: @unchecked Sendable {
    var type: (any GatehousePlugin.Type)?
    var descriptor: UnsafeMutablePointer<gh_plugin_descriptor>?
}

private let exported = Mutex(ExportState())

/// One live plugin instance: what `init` returned, kept behind the opaque state pointer.
private final class PluginInstanceBox: Sendable {
    let plugin: any GatehousePlugin
    let context: PluginContext

    init(plugin: any GatehousePlugin, context: PluginContext) {
        self.plugin = plugin
        self.context = context
    }
}

/// An exchange pointer that may cross into the handling task (and a stream's writer thread).
private struct ExchangeHandle: @unchecked Sendable {
    let pointer: OpaquePointer
}

private let initThunk: gh_init_fn = { host, plugin, stateOut, error, errorCapacity in
    guard let host, let plugin, let stateOut, let type = exported.withLock({ $0.type }) else { return 1 }
    let config = PluginConfig(json: Array(host.pointee.config_json(plugin)))
    let context = PluginContext(host: host, plugin: plugin, exchange: nil, config: config)
    do {
        let instance = try type.init(context: context)
        stateOut.pointee = Unmanaged.passRetained(PluginInstanceBox(plugin: instance, context: context)).toOpaque()
        return 0
    } catch let failure {
        if let error, errorCapacity > 0 {
            let reason = Array(String(describing: failure).utf8.prefix(errorCapacity - 1))
            reason.withUnsafeBufferPointer { bytes in
                for (offset, byte) in bytes.enumerated() { error[offset] = CChar(bitPattern: byte) }
            }
            error[reason.count] = 0
        }
        return 1
    }
}

private let handleThunk: gh_handle_fn = { state, request, exchange in
    guard let state, let request, let exchange else { return }
    let box = Unmanaged<PluginInstanceBox>.fromOpaque(state).takeUnretainedValue()
    let copied = PluginRequest(request.pointee)
    let handle = ExchangeHandle(pointer: exchange)
    Task {
        let context = box.context.scoped(to: handle.pointer)
        let response: PluginResponse
        do {
            response = try await box.plugin.handle(copied, context: context)
        } catch {
            context.error("handler failed", ["error": String(describing: error)])
            response = .error(status: 500, message: "plugin \(type(of: box.plugin).name) failed: \(error)")
        }
        await send(response, through: handle.pointer, host: box.context.host, context: context)
    }
}

private let shutdownThunk: gh_shutdown_fn = { state in
    guard let state else { return }
    let box = Unmanaged<PluginInstanceBox>.fromOpaque(state).takeRetainedValue()
    // The host calls shutdown off its request threads, so waiting here cannot starve them.
    let done = DispatchSemaphore(value: 0)
    Task {
        await box.plugin.shutdown()
        done.signal()
    }
    done.wait()
}

/// Completes the exchange with `response`, streaming chunk by chunk when the body is a stream.
private func send(_ response: PluginResponse, through exchange: OpaquePointer, host: UnsafePointer<gh_host_api>, context: PluginContext) async {
    // Field by field (`host.pointee.f`), never a copy of the whole table: a host older than
    // this PluginKit has a smaller one.
    switch response.body {
    case .bytes(let body):
        _ = withHeaderArray(response.headers) { headers, count in
            body.withUnsafeBufferPointer { bytes in
                host.pointee.respond(exchange, response.status, headers, count, gh_bytes(data: bytes.baseAddress, len: bytes.count))
            }
        }
    case .stream(let chunks):
        let started = withHeaderArray(response.headers) { headers, count in
            host.pointee.respond_start(exchange, response.status, headers, count)
        }
        // Even when the host stopped listening (timeout), the exchange must be finished.
        guard started == GH_OK else {
            _ = host.pointee.respond_finish(exchange)
            return
        }
        // Written from a thread of the stream's own, not this task's: there `respond_write` may
        // wait while the client is far behind (back-pressure), where on a task's thread, which
        // the host's response writer may need, it would cut the client off instead.
        let writer = DispatchQueue(label: "gatehouse.plugin.stream-writer")
        let exchangeHandle = ExchangeHandle(pointer: exchange)
        let write = host.pointee.respond_write!
        do {
            for try await chunk in chunks {
                let status = await withCheckedContinuation { (written: CheckedContinuation<gh_status, Never>) in
                    writer.async {
                        written.resume(returning: chunk.withUnsafeBufferPointer { bytes in
                            write(exchangeHandle.pointer, gh_bytes(data: bytes.baseAddress, len: bytes.count))
                        })
                    }
                }
                if status != GH_OK { break }  // the client went away, or was cut off
            }
        } catch {
            // Ended as failed, so the client can tell the answer is cut short (ABI 1.2); a host
            // without it can only end the answer as if whole.
            let reason = String(describing: error)
            context.error("response stream failed", ["error": reason])
            if context.hostOffers(MemoryLayout<gh_host_api>.offset(of: \gh_host_api.respond_abort)!) {
                var text = reason
                _ = text.withUTF8 { bytes in host.pointee.respond_abort(exchange, gh_bytes(data: bytes.baseAddress, len: bytes.count)) }
                return
            }
        }
        _ = host.pointee.respond_finish(exchange)
    }
}

extension PluginRequest {
    /// Copies a borrowed C request into owned Swift values.
    init(_ request: gh_request) {
        var headers: [(name: String, value: String)] = []
        headers.reserveCapacity(request.header_count)
        for index in 0..<request.header_count {
            let header = request.headers[index]
            headers.append((String(header.name), String(header.value)))
        }
        self.init(
            method: String(request.method), path: String(request.path), query: String(request.query),
            headers: headers, body: Array(request.body), requestID: String(request.request_id))
    }
}
