// Token-bucket rate limiting per client (API key, else IP) and, when configured, globally; 429 with Retry-After.
internal import Foundation
public import Hummingbird
internal import HTTPTypes
internal import Synchronization

/// A token bucket: `rate` tokens per second up to `burst`. A pure value; time is passed in.
struct TokenBucket: Sendable, Equatable {
    let rate: Double
    let burst: Double
    private(set) var tokens: Double
    private(set) var updated: Double

    init(rate: Double, burst: Double, now: Double) {
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now
    }

    /// The seconds until a token is there to take (0: one is), taking none.
    func wait(now: Double) -> Double {
        var bucket = self
        bucket.refill(now: now)
        return bucket.tokens >= 1 ? 0 : (1 - bucket.tokens) / rate
    }

    /// Takes one token if there is one; otherwise returns the seconds until there will be.
    mutating func take(now: Double) -> Double? {
        refill(now: now)
        if tokens >= 1 {
            tokens -= 1
            return nil
        }
        return (1 - tokens) / rate
    }

    /// Puts back a token taken by a request that another limit then refused.
    mutating func giveBack() {
        tokens = min(burst, tokens + 1)
    }

    mutating func refill(now: Double) {
        if now > updated {
            tokens = min(burst, tokens + (now - updated) * rate)
            updated = now
        }
    }

    func isFull(now: Double) -> Bool {
        tokens + max(0, now - updated) * rate >= burst
    }
}

/// Per-client and global token buckets behind one lock.
final class RateLimiter: Sendable {
    private struct State {
        var clients: [String: TokenBucket] = [:]
        var global: TokenBucket?
        var lastPrune = 0.0
    }

    /// Which bucket refused a request.
    enum Limit: Equatable {
        /// The client's own (its key, else its address).
        case client
        /// Everyone's together (`global_requests_per_second`).
        case global
    }

    /// A refused request: the seconds until the bucket that refused it has a token again.
    struct Refusal: Equatable {
        let wait: Double
        let limit: Limit
    }

    /// Each client's rate (requests per second); nil when only the global limit applies.
    let rate: Double?
    let burst: Double
    /// Everyone's rate together; nil when there is no global limit.
    let globalRate: Double?
    private let now: @Sendable () -> Double
    private let state: Mutex<State>
    /// Idle buckets are dropped once the table grows past this many clients.
    private let pruneThreshold = 10_000

    /// A rate of 0 (or nil) turns that limit off; the caller makes no limiter when both are off.
    init(rate: Double?, burst: Double?, globalRate: Double?, now: @escaping @Sendable () -> Double = { ProcessInfo.processInfo.systemUptime }) {
        let rate = rate.flatMap { $0 > 0 ? $0 : nil }
        self.rate = rate
        self.burst = max(1, burst ?? rate ?? 1)
        let globalRate = globalRate.flatMap { $0 > 0 ? $0 : nil }
        self.globalRate = globalRate
        self.now = now
        let start = now()
        let global = globalRate.map { TokenBucket(rate: $0, burst: max(1, $0), now: start) }
        state = Mutex(State(global: global))
    }

    /// The limiter for `requestsPerSecond` per client and `globalRequestsPerSecond` for all
    /// together, or nil when both are off (0 or absent).
    static func make(requestsPerSecond: Double, burst: Double?, globalRequestsPerSecond: Double?) -> RateLimiter? {
        guard requestsPerSecond > 0 || (globalRequestsPerSecond ?? 0) > 0 else { return nil }
        return RateLimiter(rate: requestsPerSecond, burst: burst, globalRate: globalRequestsPerSecond)
    }

    /// How many clients have a bucket (for tests and diagnostics).
    var trackedClients: Int { state.withLock { $0.clients.count } }

    /// Returns nil when `client` may proceed, else the seconds to wait.
    func check(client: String) -> Double? {
        take(client: client, countingGlobally: true)?.wait
    }

    /// Takes a token from `client`'s bucket and, when `countingGlobally`, from the global one;
    /// returns nil when the request may proceed, else which limit refused it and for how long:
    /// until both buckets have a token, since a client that waits only for its own would be
    /// refused again by the global one. A request the global bucket refuses gives the client
    /// its token back. A failed key check (not `countingGlobally`) costs the client's address
    /// at the client rate, or at the global rate when only that is set, so that keys cannot be
    /// guessed faster than some limit either way.
    func take(client: String, countingGlobally: Bool) -> Refusal? {
        let time = now()
        return state.withLock { state in
            var bucket: TokenBucket?
            if let rate = rate ?? (countingGlobally ? nil : globalRate) {
                var own = state.clients[client] ?? TokenBucket(rate: rate, burst: burst, now: time)
                if let wait = own.take(now: time) {
                    state.clients[client] = own
                    let globalWait = countingGlobally ? state.global?.wait(now: time) ?? 0 : 0
                    return Refusal(wait: max(wait, globalWait), limit: .client)
                }
                bucket = own
            }
            if countingGlobally, var global = state.global {
                if let wait = global.take(now: time) {
                    if var bucket {
                        bucket.giveBack()
                        state.clients[client] = bucket
                    }
                    return Refusal(wait: wait, limit: .global)
                }
                state.global = global
            }
            guard let bucket else { return nil }
            state.clients[client] = bucket
            // Forget idle clients, at most once a second so many active ones cannot make every
            // request pay for a scan.
            if state.clients.count > pruneThreshold, time - state.lastPrune >= 1 {
                state.lastPrune = time
                state.clients = state.clients.filter { !$0.value.isFull(now: time) }
            }
            return nil
        }
    }
}

/// Answers 429 with `Retry-After` when a client (or everyone together) exceeds the rate.
public struct RateLimitMiddleware: RouterMiddleware {
    public typealias Context = GatehouseRequestContext
    let limiter: RateLimiter

    init(limiter: RateLimiter) {
        self.limiter = limiter
    }

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        // Prometheus' scrapes are not charged: they would be refused just when the clients are
        // busiest, which is when the numbers matter (and a scrape costs no upstream call).
        guard !APIKeyCheck.isExempt(request.uri.path), request.uri.path != "/metrics" else { return try await next(request, context) }
        if let refusal = limiter.refusal(client: context.clientID, address: context.remoteAddress) { throw refusal }
        return try await next(request, context)
    }
}

extension RateLimiter {
    /// Takes a token for the client (its key digest, else its IP address), or returns the 429
    /// with `Retry-After` to answer. Shared by the router middleware and the chat pass-through.
    func refusal(client: String?, address: String) -> OpenAIError? {
        refusal(client: client ?? Self.addressBucket(address), countingGlobally: true)
    }

    /// The bucket of a client address: an IPv4 address on its own, an IPv6 address by its /64.
    /// One IPv6 host is given a whole /64 (SLAAC, privacy addresses), so it could take a fresh
    /// address, and a fresh bucket, for every request; per-/64 is the usual unit (nginx's
    /// guidance, Cloudflare's limits). An IPv4-mapped IPv6 address is its IPv4 address.
    static func addressBucket(_ address: String) -> String {
        guard address.utf8.contains(UInt8(ascii: ":")) else { return "ip:\(address)" }
        var bytes = in6_addr()
        guard inet_pton(AF_INET6, address, &bytes) == 1 else { return "ip:\(address)" }
        return withUnsafeBytes(of: &bytes) { raw in
            if raw.prefix(10).allSatisfy({ $0 == 0 }), raw[10] == 0xff, raw[11] == 0xff {
                return "ip:\(raw[12]).\(raw[13]).\(raw[14]).\(raw[15])"
            }
            let groups = stride(from: 0, to: 8, by: 2).map { String(UInt16(raw[$0]) << 8 | UInt16(raw[$0 + 1]), radix: 16) }
            return "ip6:\(groups.joined(separator: ":"))::/64"
        }
    }

    /// The answer to a request whose key check failed: its 401, or the 429 once the client's
    /// address has spent its tokens on failures, so keys cannot be guessed faster than the rate.
    /// Failures cost only the address: counted globally, requests without the key could spend
    /// the global rate and lock out every holder of the key.
    func answerToFailedKeyCheck(_ error: OpenAIError, address: String) -> OpenAIError {
        refusal(client: Self.addressBucket(address), countingGlobally: false) ?? error
    }

    private func refusal(client: String, countingGlobally: Bool) -> OpenAIError? {
        guard let refusal = take(client: client, countingGlobally: countingGlobally) else { return nil }
        switch refusal.limit {
        case .client:
            let rate = Self.format(rate ?? globalRate ?? 0)  // a failed key check's, when only the global rate is set
            return OpenAIError.rateLimited(wait: refusal.wait, code: "rate_limit_exceeded") { "rate limit exceeded (\(rate) requests/s); retry after \($0) s" }
        case .global:
            let rate = Self.format(globalRate ?? 0)
            return OpenAIError.rateLimited(wait: refusal.wait, code: "rate_limit_exceeded") {
                "global rate limit exceeded (\(rate) requests/s for all clients together); retry after \($0) s"
            }
        }
    }

    static func format(_ rate: Double) -> String {
        rate == rate.rounded() && abs(rate) < 1e15 ? String(Int(rate)) : String(rate)
    }
}
