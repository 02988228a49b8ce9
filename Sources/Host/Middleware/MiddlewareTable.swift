// The runtime table of plugin middleware, swapped atomically as plugins come and go.
internal import PluginABI
internal import Synchronization

/// One middleware a plugin registered (its spec, copied).
struct RegisteredMiddleware: @unchecked Sendable {
    enum Scope: Equatable {
        case all
        case ownRoutes(prefix: String)
        case prefix(String)
    }

    let instance: PluginInstance
    let name: String
    let priority: Int32
    let scope: Scope
    let onRequest: gh_middleware_fn?
    let onResponse: gh_middleware_fn?
    let context: UnsafeMutableRawPointer?
    /// Registration order, to keep equal priorities stable.
    let sequence: Int

    func applies(to path: String) -> Bool {
        switch scope {
        case .all: true
        case .ownRoutes(let prefix): path.hasPrefix(prefix)
        case .prefix(let prefix): path.hasPrefix(prefix)
        }
    }
}

/// Every registered middleware, sorted by priority. Readers take an immutable snapshot, so a
/// plugin being added or removed never disturbs a request in progress.
final class MiddlewareTable: Sendable {
    private struct State {
        var entries: [RegisteredMiddleware] = []
        var sequence = 0
    }

    private let state = Mutex(State())
    /// Entries in the table, readable without the lock (every request asks).
    private let count = Atomic<Int>(0)

    func add(
        instance: PluginInstance, name: String, priority: Int32, scope: RegisteredMiddleware.Scope, onRequest: gh_middleware_fn?,
        onResponse: gh_middleware_fn?, context: UnsafeMutableRawPointer?
    ) {
        let unsafeContext = UnsafeSendable(context)
        state.withLock { state in
            state.sequence += 1
            state.entries.append(
                RegisteredMiddleware(
                    instance: instance, name: name, priority: priority, scope: scope, onRequest: onRequest, onResponse: onResponse,
                    context: unsafeContext.value, sequence: state.sequence))
            state.entries.sort { ($0.priority, $0.sequence) < ($1.priority, $1.sequence) }
            count.store(state.entries.count, ordering: .releasing)
        }
    }

    /// Removes every middleware of `instance` (when that version is retired or failed to start).
    func removeAll(of instance: PluginInstance) {
        state.withLock { state in
            state.entries.removeAll { $0.instance === instance }
            count.store(state.entries.count, ordering: .releasing)
        }
    }

    /// The middleware of active plugin versions, in priority order.
    func snapshot() -> [RegisteredMiddleware] {
        state.withLock { $0.entries }.filter { $0.instance.isActive }
    }

    var isEmpty: Bool { count.load(ordering: .acquiring) == 0 }
}
