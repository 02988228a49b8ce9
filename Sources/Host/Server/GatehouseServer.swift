// The Gatehouse server: wires configuration, plugin host, middleware and routes into one HTTP app.
internal import Foundation
internal import Hummingbird
internal import HummingbirdCore
public import Logging
internal import NIOCore
internal import NIOPosix
internal import NIOSSL
internal import ServiceLifecycle
internal import Synchronization

/// The whole gateway process. Build it with a configuration, then `run()` until a signal.
public struct GatehouseServer: Sendable {
    public let config: GatehouseConfig
    public let logger: Logger
    /// Where the log lines go, reopened on SIGHUP (nil: nothing to reopen).
    public let logSink: LogSink?

    public init(config: GatehouseConfig, logger: Logger, logSink: LogSink? = nil) {
        self.config = config
        self.logger = logger
        self.logSink = logSink
    }

    /// Loads plugins, binds the listener and serves until SIGINT/SIGTERM; then stops accepting,
    /// lets in-flight requests (streams too) finish for up to `shutdownTimeout`, and shuts the
    /// plugins down. SIGHUP reopens the log file and reloads the TLS certificate (`ReloadOnHangup`).
    public func run() async throws {
        // Until ReloadOnHangup traps it, a SIGHUP would end the process (its default action).
        signal(SIGHUP, SIG_IGN)
        try config.validate()
        // Before the upstream client: once made, it must be shut down before it goes (its deinit
        // is a fatal error otherwise), so what can fail comes first or shuts it down.
        let certificates = config.tls.enabled ? try TLSCertificates(certFile: config.tls.certFile, keyFile: config.tls.keyFile, logger: logger) : nil
        let bindHost = Self.unbracketed(config.host)
        let address = Self.display(host: bindHost, port: config.port)
        // Before plugins start: a second Gatehouse on a busy port stops here, having started nothing.
        do { try ListenAddressProbe.check(host: bindHost, port: config.port) } catch { throw Self.explain(error, address: address) }
        let openFiles = OpenFilesLimit.raiseToHardLimit()
        let metrics = GatehouseMetrics()
        let upstream = UpstreamClient(config: config.upstream)
        let chat = ChatService(config: config, client: upstream, metrics: metrics)
        let services = PluginServices(chat: chat, metrics: metrics)
        let registry: PluginRegistry
        do {
            registry = try PluginRegistry(config: config, logger: logger, services: services)
        } catch {
            await upstream.shutdown()
            throw error
        }
        let limiter = RateLimiter.make(
            requestsPerSecond: config.rateLimit.requestsPerSecond, burst: config.rateLimit.burst,
            globalRequestsPerSecond: config.rateLimit.globalRequestsPerSecond)
        // Both paths name a request's client the same way (behind trusted proxies, the forwarded one).
        let clientAddresses = ClientAddressResolver(trustedProxies: config.trustedProxies.compactMap(IPRange.init))
        let passThrough = ChatPassThrough(
            config: config, chat: chat, limiter: limiter, middleware: services.middleware, metrics: metrics, clientAddresses: clientAddresses,
            logger: logger, serverName: Self.serverName)
        let server = makeServerBuilder(passThrough: passThrough, certificates: certificates, metrics: metrics)
        // From here until the service group traps them, SIGTERM and SIGINT are this watch's.
        let startupSignals = await StartupSignalWatch.start(logger: logger, patience: config.shutdownTimeout) {
            registry.removePrivateCopies()
            _exit(1)
        }
        defer { startupSignals.finish() }
        // On a thread of its own: an `init` that blocks must leave the pool to the watch's timers.
        await BlockingCall.run { registry.loadAll(shouldStop: { startupSignals.stopRequested }) }
        startupSignals.reachedStoppingPoint()
        if let since = startupSignals.secondsSinceSignal {
            let left = max(0, config.shutdownTimeout - since)
            logger.info("start-up stopped by a signal; shutting plugins down", metadata: ["drain_timeout_s": .string(String(format: "%.3f", left))])
            await registry.shutdownAll(drainTimeout: left)
            startupSignals.finish()
            await upstream.shutdown()
            logger.info("shutdown complete", metadata: ["during": .string("start-up")])
            return
        }

        // Order matters: ids first, then the access log (sees every final response), then CORS
        // (preflights, and the headers on every answer), then auth and rate limits, the refusal of
        // compressed bodies and of bodies declared over the limit, then plugins' middleware, then
        // the routes, then (for what no route took) the 405 check. HEAD is answered wherever GET
        // is, with GET's headers.
        let router = Router(context: GatehouseRequestContext.self, options: .autoGenerateHeadEndpoints)
        if clientAddresses.isEnabled { router.add(middleware: ClientAddressMiddleware(resolver: clientAddresses)) }
        router.add(middleware: RequestIDMiddleware())
        router.add(middleware: AccessLogMiddleware(metrics: metrics))
        if let cors = CORSPolicy(origins: config.corsOrigins) { router.add(middleware: CORSMiddleware(policy: cors)) }
        router.add(middleware: AuthMiddleware(apiKey: config.apiKey, limiter: limiter))
        if let limiter { router.add(middleware: RateLimitMiddleware(limiter: limiter)) }
        router.add(middleware: ContentEncodingMiddleware())
        router.add(middleware: DeclaredBodySizeMiddleware(maxBodyBytes: config.maxBodyBytes))
        router.add(middleware: PluginMiddlewareChain(services: services, maxBodyBytes: config.maxBodyBytes))
        HealthRoutes().register(on: router)
        MetricsRoutes(metrics: metrics).register(on: router)
        GatewayRoutes(chat: chat, maxBodyBytes: config.maxBodyBytes, hidesUpstreamDetails: config.apiKey != nil).register(on: router)
        PluginRoutes(registry: registry, maxBodyBytes: config.maxBodyBytes).register(on: router)
        router.add(middleware: MethodNotAllowedMiddleware(routes: router.routes))

        let connectionLimit = clientConnectionLimit(openFiles: openFiles)
        metrics.clientConnectionLimit.set(to: Double(connectionLimit ?? 0))
        let app = Application(
            router: router,
            server: server,
            configuration: .init(address: .hostname(bindHost, port: config.port), serverName: Self.serverName),
            onServerRunning: { [logger, config] channel in
                // Hummingbird has no hook into the listening socket's pipeline before it binds; this
                // runs once it listens, before the line that tells the world it does. (A connection
                // accepted in between is neither counted nor limited; nor is its close.)
                try? await channel.eventLoop.submit {
                    let gate = ClientConnectionGate(limit: connectionLimit, metrics: metrics, logger: logger)
                    try channel.pipeline.syncOperations.addHandler(gate, position: .first)
                }.get()
                let bound = channel.localAddress.map { Self.display(host: $0.ipAddress ?? bindHost, port: $0.port ?? config.port) } ?? address
                logger.info(
                    "listening",
                    metadata: [
                        "address": .string(bound), "version": .string(GatehouseVersion.release), "tls": .stringConvertible(config.tls.enabled),
                        // Whether clients need a key: an empty or null `auth.api_key` turns it off.
                        "auth": .string(config.apiKey == nil ? "off" : "api_key"),
                        "backend": .string(config.upstream.backend.rawValue), "upstream": .string(config.upstream.url),
                        "plugins_dir": .string(config.pluginsDirectory), "config": .string(config.sources.joined(separator: " < ")),
                        "chat_pass_through": .stringConvertible(passThrough != nil),
                        "open_files_limit": .string(openFiles.map { String($0) } ?? "unknown"),
                        "max_connections": .string(connectionLimit.map { String($0) } ?? "unlimited"),
                    ])
            },
            logger: logger
        )
        // Services shut down in reverse order: the clock notes the signal's time, then the app
        // stops accepting and drains, and the watch for a second signal ends last.
        let shutdownClock = ShutdownClock(logger: logger, budget: config.shutdownTimeout)
        var groupConfiguration = ServiceGroupConfiguration(
            services: [
                .init(service: StopOnSecondSignal(logger: logger), successTerminationBehavior: .ignore, failureTerminationBehavior: .cancelGroup),
                .init(service: app), .init(service: shutdownClock, successTerminationBehavior: .ignore),
                .init(service: ReloadOnHangup(logSink: logSink, certificates: certificates, logger: logger), successTerminationBehavior: .ignore),
            ],
            gracefulShutdownSignals: [.sigterm, .sigint], cancellationSignals: [], logger: logger)
        groupConfiguration.maximumGracefulShutdownDuration = Duration.milliseconds(Int64(config.shutdownTimeout * 1000))
        let serviceGroup = ServiceGroup(configuration: groupConfiguration)
        // The group traps SIGTERM and SIGINT once it runs; a signal the watch took after start-up's
        // last look, or takes before the group's trap is in place, shuts the group down all the
        // same (a request made before it runs is kept for it). The watch ends with the group.
        let handOver = Task {
            await startupSignals.waitAfterHandOver()
            if startupSignals.stopRequested { await serviceGroup.triggerGracefulShutdown() }
        }
        defer { handOver.cancel() }
        do {
            try await serviceGroup.run()
        } catch is StopOnSecondSignal.Stopped {
            // Requests in flight were cut off; plugins get no drain either.
            await registry.shutdownAll(drainTimeout: 0)
            await upstream.shutdown()
            logger.info("shutdown complete", metadata: ["forced": .string("second signal")])
            return
        } catch {
            await registry.shutdownAll(drainTimeout: 0)
            await upstream.shutdown()
            throw Self.explain(error, address: address)
        }
        // One budget for the whole shutdown: plugins drain in what the requests left of it.
        let left = config.shutdownTimeout - shutdownClock.secondsSinceSignal
        logger.info("requests drained; shutting plugins down", metadata: ["drain_timeout_s": .string(String(format: "%.3f", max(0, left)))])
        let pluginShutdown = Task { await registry.shutdownAll(drainTimeout: max(0, left)) }
        guard await StopOnSecondSignal.wait(for: pluginShutdown) else {
            logger.warning("second signal: stopping now, without waiting for plugins to finish")
            await upstream.shutdown()
            logger.info("shutdown complete", metadata: ["forced": .string("second signal")])
            return
        }
        await upstream.shutdown()
        logger.info("shutdown complete")
    }

    static let serverName = "Gatehouse"

    /// `server.max_connections`, or by default what the open-files limit leaves for client
    /// connections once plugins are loaded (nil: no limit). Warns when a configured limit is more
    /// than the descriptors allow, since past them accepting stalls instead.
    private func clientConnectionLimit(openFiles: UInt64?) -> Int? {
        let affordable = openFiles.flatMap { limit in
            OpenFilesLimit.openDescriptors().map { OpenFilesLimit.defaultClientConnections(limit: limit, openNow: $0) }
        }
        guard let configured = config.maxConnections else { return affordable }
        if configured == 0 { return nil }
        if let affordable, configured > affordable, let openFiles {
            logger.warning(
                "server.max_connections is more than the open-files limit allows: past about \(affordable) connections, accepting will stall instead",
                metadata: ["max_connections": .stringConvertible(configured), "open_files_limit": .stringConvertible(openFiles)])
        }
        return configured
    }

    /// Plain HTTP/1.1, or HTTP/1.1 over TLS with the configured PEM certificate chain and key
    /// (where a plain-HTTP request gets a readable 400); with the chat pass-through in every
    /// connection's pipeline when the backend allows it.
    private func makeServerBuilder(passThrough: ChatPassThrough?, certificates: TLSCertificates?, metrics: GatehouseMetrics) -> HTTPServerBuilder {
        let idleTimeout = config.idleTimeout > 0 ? Duration.nanoseconds(Int64(config.idleTimeout * 1e9)) : nil
        let maxBodyBytes = config.maxBodyBytes
        // `upstream.timeout`, as the pass-through's 408 for a stalled stream, and a second more,
        // so that answer comes first where it applies.
        let sendTimeout = TimeAmount.nanoseconds(Int64((config.upstream.timeout + 1) * 1e9))
        let http1 = { @Sendable (responder: @escaping HTTPChannelHandler.Responder) in
            GatehouseHTTP1Channel(
                responder: responder, passThrough: passThrough, idleTimeout: idleTimeout, maxBodyBytes: maxBodyBytes, metrics: metrics,
                sendTimeout: sendTimeout)
        }
        guard let certificates else { return HTTPServerBuilder { http1($0) } }
        let logger = self.logger
        return HTTPServerBuilder { responder in
            ReloadableTLSChannel(base: http1(responder), certificates: certificates, serverLogger: logger, metrics: metrics)
        }
    }

    /// A host as written in a URL (`[::1]`) is the host without its brackets.
    static func unbracketed(_ host: String) -> String {
        host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
    }

    /// `host:port`, an IPv6 host in brackets (`[::1]:8080`) so the port is told apart.
    static func display(host: String, port: Int) -> String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    /// Turns a bind failure into the one-line message a user needs.
    static func explain(_ error: any Error, address: String) -> any Error {
        let text = String(describing: error)
        if text.contains("Address already in use") || text.contains("errno: 98") {
            return StartupError("cannot listen on \(address): the address is already in use (another Gatehouse may be running on \(address))")
        }
        if text.contains("Permission denied") || text.contains("errno: 13") {
            return StartupError("cannot listen on \(address): permission denied")
        }
        if text.contains("Cannot assign requested address") || text.contains("errno: 99") {
            return StartupError("cannot listen on \(address): the address is not one of this machine's (server.host, GATEHOUSE_HOST or --host)")
        }
        if text.contains("Invalid argument") || text.contains("errno: 22") {
            return StartupError(
                "cannot listen on \(address): the system refuses this address (an IPv6 link-local address needs its interface, like fe80::1%eth0)")
        }
        if error is SocketAddressError.UnknownHost || text.contains("UnknownHost") {
            return StartupError("cannot listen on \(address): the host name does not resolve (server.host, GATEHOUSE_HOST or --host)")
        }
        return error
    }
}

/// A start-up failure with a one-line explanation.
public struct StartupError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Notes when graceful shutdown began (the signal), so everything after the HTTP drain knows
/// how much of `shutdown_timeout` is left, and says so in the log at once: the next line comes
/// only once the requests in flight have finished, up to `shutdown_timeout` later.
private final class ShutdownClock: Service, Sendable {
    private let began = Mutex<ContinuousClock.Instant?>(nil)
    private let logger: Logger
    private let budget: Double

    init(logger: Logger, budget: Double) {
        self.logger = logger
        self.budget = budget
    }

    func run() async throws {
        // Returns when graceful shutdown is triggered; throws on cancellation.
        guard (try? await gracefulShutdown()) != nil else { return }
        began.withLock { $0 = .now }
        logger.info(
            "shutting down: no new connections; requests in flight may finish",
            metadata: ["drain_timeout_s": .string(String(format: "%.3f", budget))])
    }

    /// Seconds since graceful shutdown began (0 if it has not).
    var secondsSinceSignal: Double {
        guard let began = began.withLock({ $0 }) else { return 0 }
        return (ContinuousClock.now - began).inSeconds
    }
}
