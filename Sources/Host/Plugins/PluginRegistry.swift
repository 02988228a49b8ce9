// Discovery of plugins.d, the state of every plugin, and the runtime dispatch table.
public import Foundation
public import Logging
internal import Synchronization

/// Knows every plugin found in the plugins directory and routes requests to loaded ones.
///
/// Dispatch goes through a table guarded by a lock (never routes baked into the HTTP router),
/// so a plugin's entry can change at runtime without touching the router. Today plugins are
/// loaded once at start-up; the table is what a hot reload will swap.
public final class PluginRegistry: Sendable {
    public enum State: String, Sendable {
        case loaded, disabled, failed
    }

    /// What `GET /v1/plugins` reports for one plugin.
    public struct Status: Sendable {
        public var name: String
        public var version: String?
        public var state: State
        public var error: String?
        public var abi: Int?
        public var sha256: String?
        public var loadedAt: Date?
        public var description: String?
        public var directory: String
    }

    private struct Slot {
        var status: Status
        var instance: PluginInstance?
    }

    public let pluginsDirectory: String
    private let loader: PluginLoader
    private let logger: Logger
    private let slots = Mutex<[String: Slot]>([:])
    private let config: Mutex<GatehouseConfig>
    let services: PluginServices

    /// - Parameter services: what plugins may use; nil gives them no LLM and private metrics
    ///   (offline tools such as `gatehouse plugins list`).
    init(config: GatehouseConfig, logger: Logger, services: PluginServices?) throws {
        self.pluginsDirectory = config.pluginsDirectory
        self.config = Mutex(config)
        self.logger = logger
        self.loader = try PluginLoader()
        self.services = services ?? PluginServices(chat: nil, metrics: GatehouseMetrics())
    }

    /// A registry for offline use: plugins load and initialise, but have no LLM.
    public convenience init(config: GatehouseConfig, logger: Logger) throws {
        try self.init(config: config, logger: logger, services: nil)
    }

    /// Scans the plugins directory and loads every enabled plugin. A plugin that fails is
    /// recorded with its reason; the others load regardless.
    /// - Parameter shouldStop: asked before each plugin; once true, the rest are not loaded (a
    ///   signal during start-up).
    public func loadAll(shouldStop: () -> Bool = { false }) {
        let names: [String]
        do {
            names = try FileManager.default.contentsOfDirectory(atPath: pluginsDirectory)
                .filter { !$0.hasPrefix(".") }
                .filter { isDirectory((pluginsDirectory as NSString).appendingPathComponent($0)) }
                .sorted()
        } catch {
            logger.error(
                "cannot read the plugins directory; serving without plugins",
                metadata: ["directory": .string(pluginsDirectory), "error": .string(Self.directoryProblem(pluginsDirectory) ?? "\(error)")])
            warnOfConfiguredPlugins(notIn: [])
            return
        }
        for name in names {
            guard !shouldStop() else {
                logger.info("start-up stopped by a signal: plugin not loaded", metadata: ["plugin": .string(name)])
                continue
            }
            load(name)
        }
        warnOfConfiguredPlugins(notIn: Set(names))
    }

    /// One warning for each plugin the config mentions that is not among `found` (a typo in its
    /// name, or in `plugins_dir`: a plugin enforcing a policy would be missed without a word).
    private func warnOfConfiguredPlugins(notIn found: Set<String>) {
        for name in config.withLock({ $0.plugins.keys }).sorted() where !found.contains(name) {
            logger.warning(
                "config mentions a plugin that is not in the plugins directory",
                metadata: ["plugin": .string(name), "directory": .string(pluginsDirectory)])
        }
    }

    /// What keeps `path` from being read as a directory, in a few words (Foundation's error for
    /// it is a paragraph of NSCocoaErrorDomain), or nil when nothing seems to.
    public static func directoryProblem(_ path: String) -> String? {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else { return "no such directory" }
        if !isDirectory.boolValue { return "not a directory" }
        return FileManager.default.isReadableFile(atPath: path) ? nil : "not readable by this user"
    }

    /// Loads (or refuses) the plugin in `<plugins dir>/<name>`.
    public func load(_ name: String) {
        let directory = (pluginsDirectory as NSString).appendingPathComponent(name)
        var status = Status(name: name, state: .failed, directory: directory)
        let (settings, upstreamTimeout, environment) = config.withLock {
            ($0.settings(forPlugin: name), $0.upstream.timeout, $0.pluginEnvironment)
        }
        let manifest: PluginManifest
        do {
            manifest = try PluginManifest.load(directory: directory)
            status.version = manifest.version
            status.abi = manifest.abi
            status.description = manifest.description
        } catch {
            status.error = "\(error)"
            record(status, instance: nil)
            return
        }
        guard settings.enabled else {
            status.state = .disabled
            record(status, instance: nil)
            return
        }
        let stats = services.stats(for: name)
        // The custom metrics before this version's `init`: those it declares go with it if it fails.
        var metricsBeforeInit: Set<String>?
        do {
            let library = try loader.open(manifest, pluginsDirectory: pluginsDirectory)
            status.sha256 = library.sha256
            let configJSON = try PluginConfigLayers.effective(
                defaults: manifest.configJSON, file: settings.configJSON, environment: environment, plugin: name)
            let rate = settings.rateLimit ?? manifest.rateLimit
            let instance = PluginInstance(
                manifest: manifest, library: library, configJSON: configJSON, logger: logger.with(plugin: name), services: services,
                timeout: settings.timeout ?? manifest.timeout ?? upstreamTimeout,
                rateLimiter: rate.flatMap { $0 > 0 ? RateLimiter(rate: $0, burst: nil, globalRate: nil) : nil })
            // `init` has no time limit (native code cannot be stopped) and start-up waits for it:
            // a slow one is named, or the operator sees a gateway that never listens and no why.
            let slowInit = DispatchWorkItem { [logger] in
                logger.warning("plugin init has not returned after 5 s; start-up waits for it", metadata: ["plugin": .string(name)])
            }
            DispatchQueue.global().asyncAfter(deadline: .now() + 5, execute: slowInit)
            defer { slowInit.cancel() }
            metricsBeforeInit = stats.customMetricNames()
            try instance.initialize()
            status.state = .loaded
            status.loadedAt = instance.loadedAt
            stats.loaded(isReload: false)
            instance.activate()
            record(status, instance: instance)
        } catch {
            if let metricsBeforeInit { stats.removeCustomMetrics(except: metricsBeforeInit) }
            stats.loadFailed()
            status.error = "\(error)"
            record(status, instance: nil)
        }
    }

    private func record(_ status: Status, instance: PluginInstance?) {
        var status = status
        // One line, as the reason's readers take it (`plugins list` rows, log fields): a plugin's
        // init text or a manifest value may hold line breaks.
        status.error = status.error.map { String(String.UnicodeScalarView($0.unicodeScalars.map { $0.properties.generalCategory == .control ? " " : $0 })) }
        slots.withLock { $0[status.name] = Slot(status: status, instance: instance) }
        var metadata: Logger.Metadata = ["plugin": .string(status.name), "state": .string(status.state.rawValue)]
        if let version = status.version { metadata["version"] = .string(version) }
        if let error = status.error {
            metadata["reason"] = .string(error)
            logger.error("plugin refused", metadata: metadata)
        } else {
            logger.info("plugin \(status.state.rawValue)", metadata: metadata)
        }
    }

    /// Every discovered plugin, sorted by name.
    public func statuses() -> [Status] {
        slots.withLock { $0.values.map(\.status) }.sorted { $0.name < $1.name }
    }

    public func status(of name: String) -> Status? {
        slots.withLock { $0[name]?.status }
    }

    /// The loaded instance for `name` with one request counted in, or nil. The caller must
    /// complete a request through the instance (which counts it out).
    func acquire(_ name: String) -> PluginInstance? {
        slots.withLock { slots in
            guard let instance = slots[name]?.instance else { return nil }
            instance.requestStarted()
            return instance
        }
    }

    /// The measurements of `name` (also for plugins that are not loaded).
    func stats(for name: String) -> PluginStats { services.stats(for: name) }

    /// The stats of a plugin that has some: one disabled, or with an invalid manifest, has none
    /// (and looking must not create its series in `/metrics`).
    func existingStats(for name: String) -> PluginStats? { services.existingStats(for: name) }

    /// Stops dispatching to every plugin, waits (up to `drainTimeout` seconds) for their
    /// requests, and shuts them down.
    public func shutdownAll(drainTimeout: Double) async {
        let instances = slots.withLock { slots in
            let live = slots.values.compactMap(\.instance)
            for key in slots.keys { slots[key]?.instance = nil }
            return live
        }
        instances.forEach { $0.deactivate() }
        await withTaskGroup(of: Void.self) { group in
            for instance in instances { group.addTask { await instance.shutdown(drainTimeout: drainTimeout) } }
        }
        loader.removePrivateCopies()
    }

    /// Removes the private library copies without shutting anything down, for a process about
    /// to exit at once (loaded libraries stay mapped; only the names go).
    func removePrivateCopies() { loader.removePrivateCopies() }

    private func isDirectory(_ path: String) -> Bool {
        var isDirectory: ObjCBool = false
        return FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) && isDirectory.boolValue
    }
}

/// A plugin's effective configuration: manifest defaults < gatehouse.yaml < environment.
enum PluginConfigLayers {
    /// Merges the layers into one JSON object. Environment variables
    /// `GATEHOUSE_PLUGIN_<NAME>_<KEY>` (NAME upper-cased, '-' as '_') set top-level key
    /// `<key>` (lower-cased); values that parse as JSON (numbers, booleans, null, arrays,
    /// objects, quoted strings) are taken as such, anything else as a plain string. Names that
    /// are prefixes of others overlap: `hello` also reads `GATEHOUSE_PLUGIN_HELLO_C_*`.
    static func effective(defaults: Data, file: Data?, environment: [String: String], plugin: String) throws -> Data {
        var merged = merge(object(defaults), object(file ?? Data("{}".utf8)))
        let prefix = GatehouseConfig.pluginEnvironmentPrefix + plugin.uppercased().replacingOccurrences(of: "-", with: "_") + "_"
        for (variable, value) in environment where variable.hasPrefix(prefix) && variable.count > prefix.count {
            let key = String(variable.dropFirst(prefix.count)).lowercased()
            merged[key] = (try? JSONSerialization.jsonObject(with: Data(value.utf8), options: [.fragmentsAllowed])) ?? value
        }
        return try JSONSerialization.data(withJSONObject: merged, options: [.sortedKeys, .withoutEscapingSlashes])
    }

    private static func object(_ data: Data) -> [String: Any] {
        ((try? JSONSerialization.jsonObject(with: data)) as? [String: Any]) ?? [:]
    }

    /// Deep merge: `top` wins; nested objects merge key by key.
    static func merge(_ base: [String: Any], _ top: [String: Any]) -> [String: Any] {
        base.merging(top) { old, new in
            if let oldObject = old as? [String: Any], let newObject = new as? [String: Any] { return merge(oldObject, newObject) }
            return new
        }
    }
}

extension Logger {
    /// A copy whose every line carries `plugin`.
    func with(plugin name: String) -> Logger {
        var copy = self
        copy[metadataKey: "plugin"] = .string(name)
        return copy
    }
}
