// The Gatehouse server: wires configuration, plugin host, middleware and routes into one HTTP app.
internal import Foundation
internal import Hummingbird
public import Logging
internal import NIOCore
internal import NIOPosix
internal import ServiceLifecycle

/// The whole gateway process. Build it with a configuration, then `run()` until a signal.
public struct GatehouseServer: Sendable {
    public let config: GatehouseConfig
    public let logger: Logger

    public init(config: GatehouseConfig, logger: Logger) {
        self.config = config
        self.logger = logger
    }

    /// Loads plugins, binds the listener and serves until SIGINT/SIGTERM, then drains
    /// in-flight requests (up to `shutdownTimeout`) and shuts the plugins down.
    public func run() async throws {
        try config.validate()
        let registry = try PluginRegistry(config: config, logger: logger)
        registry.loadAll()

        let router = Router(context: GatehouseRequestContext.self)
        router.add(middleware: RequestIDMiddleware())
        router.add(middleware: ErrorMiddleware())
        HealthRoutes().register(on: router)
        PluginRoutes(registry: registry, maxBodyBytes: config.maxBodyBytes).register(on: router)

        let address = "\(config.host):\(config.port)"
        let app = Application(
            router: router,
            configuration: .init(address: .hostname(config.host, port: config.port), serverName: "Gatehouse"),
            onServerRunning: { [logger] channel in
                let bound = channel.localAddress.map { "\($0.ipAddress ?? config.host):\($0.port ?? config.port)" } ?? address
                logger.info("listening", metadata: ["address": .string(bound), "plugins_dir": .string(config.pluginsDirectory)])
            },
            logger: logger
        )
        let serviceGroup = ServiceGroup(
            configuration: .init(
                services: [.init(service: app)],
                gracefulShutdownSignals: [.sigterm, .sigint],
                cancellationSignals: [],
                logger: logger))
        do {
            try await serviceGroup.run()
        } catch {
            await registry.shutdownAll(drainTimeout: config.shutdownTimeout)
            throw Self.explain(error, address: address)
        }
        logger.info("stopped accepting; shutting plugins down")
        await registry.shutdownAll(drainTimeout: config.shutdownTimeout)
        logger.info("shutdown complete")
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
        return error
    }
}

/// A start-up failure with a one-line explanation.
public struct StartupError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
