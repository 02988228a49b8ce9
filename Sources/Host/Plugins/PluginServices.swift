// What the host lends every plugin instance: the chat pipeline, the middleware table, metrics.
internal import Foundation
internal import Prometheus
internal import Synchronization

/// Host services shared by all plugin instances of one process.
final class PluginServices: Sendable {
    /// The chat pipeline, or nil where no gateway runs (e.g. `gatehouse plugins list`).
    let chat: ChatService?
    let middleware: MiddlewareTable
    let metrics: GatehouseMetrics
    let customMetrics = CustomMetricCatalog()
    private let stats = Mutex<[String: PluginStats]>([:])

    init(chat: ChatService?, metrics: GatehouseMetrics) {
        self.chat = chat
        self.metrics = metrics
        self.middleware = MiddlewareTable()
    }

    /// The plugin's stats, if they were created (when it was first loaded or refused).
    func existingStats(for name: String) -> PluginStats? {
        stats.withLock { $0[name] }
    }

    /// The measurements of plugin `name`, created on first use and kept across versions.
    func stats(for name: String) -> PluginStats {
        stats.withLock { stats in
            if let existing = stats[name] { return existing }
            let created = PluginStats(plugin: name, registry: metrics.registry)
            stats[name] = created
            return created
        }
    }
}
