// Bounded LRU cache with TTL for non-streaming chat completions.
internal import Foundation
internal import Synchronization

/// A least-recently-used cache bounded by entry count and total bytes, with a time to live.
/// Thread-safe; the clock is injectable so expiry can be tested without waiting.
final class ResponseCache: Sendable {
    struct Limits: Sendable {
        var maxEntries: Int
        var maxBytes: Int
        var ttl: Double
    }

    /// Only ever touched under `state`'s lock.
    private final class Node: @unchecked Sendable {
        let key: String
        let value: ChatCompletion
        let size: Int
        let expires: Double
        var older: Node?
        weak var newer: Node?

        init(key: String, value: ChatCompletion, size: Int, expires: Double) {
            self.key = key
            self.value = value
            self.size = size
            self.expires = expires
        }
    }

    private struct State {
        var nodes: [String: Node] = [:]
        var newest: Node?
        weak var oldest: Node?
        var bytes = 0
    }

    let limits: Limits
    private let now: @Sendable () -> Double
    private let state = Mutex(State())

    init(limits: Limits, now: @escaping @Sendable () -> Double = { ProcessInfo.processInfo.systemUptime }) {
        self.limits = limits
        self.now = now
    }

    var count: Int { state.withLock { $0.nodes.count } }
    var bytes: Int { state.withLock { $0.bytes } }

    func get(_ key: String) -> ChatCompletion? {
        let time = now()
        return state.withLock { state in
            guard let node = state.nodes[key] else { return nil }
            guard node.expires > time else {
                Self.unlink(node, from: &state)
                return nil
            }
            Self.unlink(node, from: &state)
            Self.pushNewest(node, into: &state)
            return node.value
        }
    }

    /// What an entry costs beyond its answer and key (node, table slot, `Data`), counted in
    /// `max_bytes` so that many small answers cannot take twice the memory it allows.
    static let entryOverhead = 256

    /// Stores `value` under `key` when it is a whole answer (`isCompleteAnswer`) that fits in
    /// `max_bytes`; either way it supersedes what `key` held. Returns whether it was stored.
    @discardableResult
    func put(_ key: String, _ value: ChatCompletion) -> Bool {
        let size = value.json.count + key.utf8.count + Self.entryOverhead
        let storable = size <= limits.maxBytes && Self.isCompleteAnswer(value.json)
        let node = storable ? Node(key: key, value: value, size: size, expires: now() + limits.ttl) : nil
        return state.withLock { state in
            if let existing = state.nodes[key] { Self.unlink(existing, from: &state) }
            guard let node else { return false }
            Self.pushNewest(node, into: &state)
            while state.nodes.count > limits.maxEntries || state.bytes > limits.maxBytes, let oldest = state.oldest {
                Self.unlink(oldest, from: &state)
            }
            return true
        }
    }

    /// Whether `json` is a whole chat completion, worth replaying: a JSON object with choices
    /// and no error. A 200 that is not one (a body cut short where the connection closed, the
    /// upstream having sent no length; an error some servers send with a 200) would otherwise
    /// be served to every identical request for the TTL.
    static func isCompleteAnswer(_ json: Data) -> Bool {
        guard let object = (try? JSONSerialization.jsonObject(with: json)) as? [String: Any],
            let choices = object["choices"] as? [Any], !choices.isEmpty
        else { return false }
        return object["error"] == nil || object["error"] is NSNull
    }

    private static func pushNewest(_ node: Node, into state: inout State) {
        node.older = state.newest
        node.newer = nil
        state.newest?.newer = node
        state.newest = node
        if state.oldest == nil { state.oldest = node }
        state.nodes[node.key] = node
        state.bytes += node.size
    }

    private static func unlink(_ node: Node, from state: inout State) {
        guard state.nodes.removeValue(forKey: node.key) != nil else { return }
        state.bytes -= node.size
        if let newer = node.newer { newer.older = node.older } else { state.newest = node.older }
        if let older = node.older { older.newer = node.newer } else { state.oldest = node.newer }
        node.older = nil
        node.newer = nil
    }
}

/// How one request may use the response cache, as its client's `Cache-Control` asks (RFC 9111
/// 5.2.1): a client that distrusts a cached answer can get a fresh one without turning the
/// cache off for everyone.
enum CacheUse: Sendable, Equatable {
    /// Answer from the cache when it can; store what the upstream answers.
    case normal
    /// `no-cache` (or `max-age=0`): go upstream, and store the fresh answer for later requests.
    case refresh
    /// `no-store`: go upstream and store nothing.
    case bypass

    /// The use a `Cache-Control` request header asks for (directives are case-insensitive).
    init(cacheControl: String?) {
        guard let cacheControl else {
            self = .normal
            return
        }
        let directives = cacheControl.lowercased().split(separator: ",").map { $0.filter { !$0.isWhitespace } }
        if directives.contains("no-store") {
            self = .bypass
        } else if directives.contains("no-cache") || directives.contains("max-age=0") {
            self = .refresh
        } else {
            self = .normal
        }
    }

    /// What `X-Cache` says of an answer fetched upstream under this use: nil when it is not
    /// stored (`no-store`), else a refresh or a plain miss.
    var storedOutcome: CacheOutcome? {
        switch self {
        case .normal: .miss
        case .refresh: .refresh
        case .bypass: nil
        }
    }
}

/// What the cache did for a non-streaming chat completion: the `X-Cache` response header.
enum CacheOutcome: String, Sendable {
    case hit = "HIT"
    case miss = "MISS"
    /// Fetched fresh at the client's request (`no-cache`) and stored.
    case refresh = "REFRESH"
    /// The cache is off, or the client asked it be left alone (`no-store`).
    case bypass = "BYPASS"
}

