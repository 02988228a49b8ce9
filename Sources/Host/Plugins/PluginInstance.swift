// One initialised version of a plugin: its library, state, in-flight count and request hand-off.
internal import Dispatch
public import Foundation
internal import Logging
internal import NIOCore
internal import PluginABI
internal import Synchronization

/// An HTTP request bound for a plugin, owned by the host until the call returns.
struct PluginCall: Sendable {
    var method: String
    /// Path relative to `/v1/plugins/<name>`, starting with "/".
    var path: String
    var query: String
    /// Lower-case names.
    var headers: [(String, String)]
    var body: ByteBuffer
    var requestID: String

    /// Calls `body` with a borrowed C view of this request: one arena for all the strings.
    func withCRequest<R>(_ body: (UnsafePointer<gh_request>) -> R) -> R {
        var arena: [UInt8] = []
        arena.reserveCapacity(64 + headers.reduce(0) { $0 + $1.0.utf8.count + $1.1.utf8.count })
        func add(_ text: String) -> Range<Int> {
            let start = arena.count
            arena.append(contentsOf: text.utf8)
            return start..<arena.count
        }
        let method = add(self.method), path = add(self.path), query = add(self.query), requestID = add(self.requestID)
        let headerSpans = headers.map { (add($0.0), add($0.1)) }
        return arena.withUnsafeBufferPointer { arenaBytes in
            func view(_ range: Range<Int>) -> gh_bytes {
                gh_bytes(data: arenaBytes.baseAddress.map { $0 + range.lowerBound }, len: range.count)
            }
            let cHeaders = headerSpans.map { gh_header(name: view($0.0), value: view($0.1)) }
            return cHeaders.withUnsafeBufferPointer { headerBuffer in
                self.body.withUnsafeReadableBytes { bodyBytes in
                    var request = gh_request(
                        struct_size: UInt32(MemoryLayout<gh_request>.size),
                        method: view(method), path: view(path), query: view(query),
                        headers: headerBuffer.baseAddress, header_count: headerBuffer.count,
                        body: gh_bytes(data: bodyBytes.baseAddress?.assumingMemoryBound(to: UInt8.self), len: bodyBytes.count),
                        request_id: view(requestID))
                    return body(&request)
                }
            }
        }
    }
}

/// One loaded and initialised version of a plugin.
///
/// Instances are retained for the life of the process (the `gh_plugin*` handed to the plugin
/// must never dangle, and Swift libraries are never unloaded anyway): about a hundred bytes
/// per version ever loaded.
public final class PluginInstance: @unchecked Sendable {
    public let manifest: PluginManifest
    public let sha256: String
    public let loadedAt: Date
    let library: OpenedLibrary
    let logger: Logger
    let services: PluginServices
    let stats: PluginStats
    /// Seconds a request may wait for this plugin's answer.
    let timeout: Double
    /// This plugin's own request limit, when it has one.
    let rateLimiter: RateLimiter?
    /// True while this version serves: between installation and retirement. Its middleware
    /// run only while it is true.
    var isActive: Bool { active.load(ordering: .acquiring) }
    private let active = Atomic<Bool>(false)
    /// The effective config as NUL-terminated JSON; lives as long as the instance.
    let configJSON: UnsafeMutableBufferPointer<UInt8>
    /// Set once by `initialize`, before any request.
    private var state: UnsafeMutableRawPointer?

    private let inFlightCount = Atomic<Int>(0)

    init(
        manifest: PluginManifest, library: OpenedLibrary, configJSON: Data, logger: Logger, services: PluginServices, timeout: Double,
        rateLimiter: RateLimiter?
    ) {
        self.manifest = manifest
        self.library = library
        self.sha256 = library.sha256
        self.loadedAt = Date()
        self.logger = logger
        self.services = services
        self.stats = services.stats(for: manifest.name)
        self.timeout = timeout
        self.rateLimiter = rateLimiter
        let buffer = UnsafeMutableBufferPointer<UInt8>.allocate(capacity: configJSON.count + 1)
        _ = buffer.initialize(from: configJSON)
        buffer[configJSON.count] = 0
        self.configJSON = UnsafeMutableBufferPointer(rebasing: buffer[0..<configJSON.count])
    }

    /// The `gh_plugin*` this instance is known by in host calls.
    var pluginPointer: OpaquePointer { OpaquePointer(Unmanaged.passUnretained(self).toOpaque()) }

    static func from(_ pointer: OpaquePointer?) -> PluginInstance? {
        guard let pointer else { return nil }
        return Unmanaged<PluginInstance>.fromOpaque(UnsafeRawPointer(pointer)).takeUnretainedValue()
    }

    /// Calls the plugin's `init`. On failure the instance must be discarded.
    func initialize() throws {
        _ = Unmanaged.passRetained(self)  // see the type's doc: kept for the life of the process
        var error = [CChar](repeating: 0, count: 512)
        var newState: UnsafeMutableRawPointer?
        let status = library.descriptor.pointee.`init`(HostAPI.table, pluginPointer, &newState, &error, error.count)
        guard status == 0 else {
            services.middleware.removeAll(of: self)
            let reason = String(decoding: error.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw PluginLoadError("init failed: \(reason.isEmpty ? "status \(status), no reason given" : reason)")
        }
        state = newState
    }

    /// Starts serving: requests are routed here and its middleware run.
    func activate() {
        active.store(true, ordering: .releasing)
    }

    /// Stops this version's middleware; the registry has already stopped routing to it.
    func deactivate() {
        active.store(false, ordering: .releasing)
        services.middleware.removeAll(of: self)
    }

    /// Counts a request in; called by the registry while it holds its table lock so that a
    /// version being retired cannot miss it.
    func requestStarted() {
        inFlightCount.add(1, ordering: .relaxed)
    }

    func requestFinished() {
        inFlightCount.subtract(1, ordering: .releasing)
    }

    var inFlight: Int { inFlightCount.load(ordering: .acquiring) }

    /// Hands `call` to the plugin and waits for its answer (or the timeout). The caller must
    /// have called `requestStarted`; the exchange's completion calls `requestFinished`.
    func handle(_ call: PluginCall) async -> PluginReply {
        let exchange = PluginExchange(instance: self, requestID: call.requestID)
        let pointer = exchange.register()
        let timer = Task {
            try await Task.sleep(for: .seconds(timeout))
            exchange.timeOut()
        }
        defer { timer.cancel() }
        let handle = library.descriptor.pointee.handle!
        // Cancelled (at the end of the shutdown's time), the wait ends as a timeout would: a
        // plugin that never answers must not hold the process past `shutdown_timeout`.
        return await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                exchange.waitForReply(continuation)
                call.withCRequest { request in handle(state, request, pointer) }
            }
        } onCancel: {
            exchange.abandon()
        }
    }

    /// Waits (up to `drainTimeout` seconds) until every exchange has completed, then calls the
    /// plugin's `shutdown` on a thread outside the concurrency pool (a plugin may block there).
    /// If exchanges are still open at the deadline, `shutdown` is not called: the ABI promises
    /// plugins it never runs while an exchange is live.
    func shutdown(drainTimeout: Double) async {
        let deadline = ContinuousClock.now + .seconds(drainTimeout)
        while inFlight > 0 {
            guard ContinuousClock.now < deadline, !Task.isCancelled else {
                logger.warning(
                    "plugin still has unfinished requests at the drain deadline; not calling its shutdown",
                    metadata: ["in_flight": .stringConvertible(inFlight), "version": .string(manifest.version)])
                return
            }
            try? await Task.sleep(for: .milliseconds(10))
        }
        let shutdown = library.descriptor.pointee.shutdown!
        let state = UnsafeSendable(state)
        // Within what is left of the budget (at least a second, for a plugin whose requests took
        // all of it): a `shutdown` that blocks must not keep the process from exiting.
        let limit = max(deadline - ContinuousClock.now, .seconds(1))
        let called = ContinuousClock.now
        guard await BlockingCall.run(atMost: limit, { shutdown(state.value) }) else {
            logger.warning(
                "plugin's shutdown did not return in time; exiting without waiting for it",
                metadata: ["waited_s": .string(String(format: "%.3f", (ContinuousClock.now - called).inSeconds)), "version": .string(manifest.version)])
            return
        }
        logger.info("plugin shut down", metadata: ["version": .string(manifest.version)])
    }
}

/// Carries a non-Sendable value (a C pointer) across a concurrency boundary we control.
struct UnsafeSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
