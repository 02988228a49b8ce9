// What the chat pass-through keeps per event loop: its upstream pool, the Date header, metric handles.
internal import Foundation
internal import NIOCore
internal import Prometheus

/// The pass-through's state for one event loop, used only on that loop, so the request path
/// takes no lock for it: the upstream connections, the `Date` header of the current second,
/// and the metric objects already looked up (GatehouseMetrics finds them behind a lock).
final class PassThroughLoop {
    let pool: UpstreamConnectionPool
    private let metrics: GatehouseMetrics?
    private let backend: String
    private var dateCache = HTTPDateCache()
    private var requestCounters: [Int: Counter] = [:]
    private lazy var requestDuration = metrics?.requestDuration(route: ChatPassThrough.path)
    private lazy var firstByteDuration = metrics?.firstByteDuration(route: ChatPassThrough.path)
    private lazy var upstreamChat = metrics?.upstreamDuration(backend: backend, operation: "chat")
    private lazy var upstreamStream = metrics?.upstreamDuration(backend: backend, operation: "chat_stream")
    private lazy var upstreamChatFailed = metrics?.upstreamDuration(backend: backend, operation: "chat", outcome: .error)
    private lazy var upstreamStreamFailed = metrics?.upstreamDuration(backend: backend, operation: "chat_stream", outcome: .error)

    init(pool: UpstreamConnectionPool, metrics: GatehouseMetrics?, backend: String) {
        self.pool = pool
        self.metrics = metrics
        self.backend = backend
    }

    // MARK: Deadlines

    /// Exchanges waiting on the upstream. One sweep a tick checks their deadlines: cheaper than
    /// a scheduled task per request (NIO's timer heap cancels by linear search), and timeouts
    /// are whole seconds, so a tenth of a second late is fine.
    private var watched: [ChatExchange] = []
    private var sweepScheduled = false
    static let sweepInterval = TimeAmount.milliseconds(100)

    func watch(_ exchange: ChatExchange) {
        guard exchange.watchIndex == nil else { return }
        exchange.watchIndex = watched.count
        watched.append(exchange)
        scheduleSweep()
    }

    func unwatch(_ exchange: ChatExchange) {
        guard let index = exchange.watchIndex else { return }
        exchange.watchIndex = nil
        let last = watched.removeLast()
        if index < watched.count {
            watched[index] = last
            last.watchIndex = index
        }
    }

    private func scheduleSweep() {
        guard !sweepScheduled else { return }
        sweepScheduled = true
        // Strong: a loop's state lives as long as the pass-through (and a weak reference would
        // give it a side table, slowing every retain and release of it).
        pool.eventLoop.assumeIsolated().scheduleTask(in: Self.sweepInterval) { self.sweep() }
    }

    private func sweep() {
        sweepScheduled = false
        let now = NIODeadline.now()
        // A snapshot: handling one exchange may unwatch or re-arm others.
        for exchange in watched where exchange.watchIndex != nil {
            if let deadline = exchange.deadline, deadline <= now { exchange.deadlinePassed() }
        }
        if !watched.isEmpty { scheduleSweep() }
    }

    /// The `Date` header value for now.
    var httpDate: String { dateCache.now() }

    /// Counts one finished chat request, as GatehouseMetrics.recordRequest does for the router;
    /// a stream's time to its first byte too.
    func recordRequest(status: Int, duration: Duration, firstByte: Duration?) {
        if let firstByte { firstByteDuration?.record(firstByte) }
        guard let metrics else { return }
        let counter: Counter
        if let cached = requestCounters[status] {
            counter = cached
        } else {
            counter = metrics.requestCounter(route: ChatPassThrough.path, method: "POST", status: status)
            requestCounters[status] = counter
        }
        counter.increment()
        requestDuration?.record(duration)
    }

    /// Records a successful upstream call and its token counts.
    func recordUpstream(streamed: Bool, duration: Duration, prompt: Int, completion: Int) {
        (streamed ? upstreamStream : upstreamChat)?.record(duration)
        metrics?.recordTokens(prompt: prompt, completion: completion)
    }

    /// Records an upstream call that failed (an error status, a timeout, a lost connection, a
    /// reply that is not a whole answer).
    func recordUpstreamFailure(streamed: Bool, duration: Duration) {
        (streamed ? upstreamStreamFailed : upstreamChatFailed)?.record(duration)
    }
}

/// The RFC 9110 `Date` value, formatted once per second.
struct HTTPDateCache {
    private var second = -1
    private var text = ""
    private static let days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
    private static let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

    mutating func now() -> String {
        var seconds = time(nil)
        guard seconds != second else { return text }
        second = seconds
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
        text = "\(Self.days[Int(parts.tm_wday)]), \(two(parts.tm_mday)) \(Self.months[Int(parts.tm_mon)]) \(1900 + parts.tm_year) "
            + "\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec)) GMT"
        return text
    }
}
