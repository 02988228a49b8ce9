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

    let rate: Double
    let burst: Double
    private let now: @Sendable () -> Double
    private let state: Mutex<State>
    /// Idle buckets are dropped once the table grows past this many clients.
    private let pruneThreshold = 10_000

    init(rate: Double, burst: Double?, globalRate: Double?, now: @escaping @Sendable () -> Double = { ProcessInfo.processInfo.systemUptime }) {
        self.rate = rate
        self.burst = max(1, burst ?? rate)
        self.now = now
        let start = now()
        let global = globalRate.map { TokenBucket(rate: $0, burst: max(1, $0), now: start) }
        state = Mutex(State(global: global))
    }

    /// How many clients have a bucket (for tests and diagnostics).
    var trackedClients: Int { state.withLock { $0.clients.count } }

    /// Returns nil when `client` may proceed, else the seconds to wait.
    func check(client: String) -> Double? {
        let time = now()
        return state.withLock { state in
            var bucket = state.clients[client] ?? TokenBucket(rate: rate, burst: burst, now: time)
            if let wait = bucket.take(now: time) {
                state.clients[client] = bucket
                return wait
            }
            if var global = state.global {
                if let wait = global.take(now: time) {
                    bucket.giveBack()
                    state.clients[client] = bucket
                    return wait
                }
                state.global = global
            }
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
        guard !APIKeyCheck.isExempt(request.uri.path) else { return try await next(request, context) }
        if let refusal = limiter.refusal(client: context.clientID, address: context.remoteAddress) { throw refusal }
        return try await next(request, context)
    }
}

extension RateLimiter {
    /// Takes a token for the client (its key digest, else its IP address), or returns the 429
    /// with `Retry-After` to answer. Shared by the router middleware and the chat pass-through.
    func refusal(client: String?, address: String) -> OpenAIError? {
        guard let wait = check(client: client ?? "ip:\(address)") else { return nil }
        return OpenAIError.rateLimited(wait: wait, code: "rate_limit_exceeded") {
            "rate limit exceeded (\(Self.format(rate)) requests/s); retry after \($0) s"
        }
    }

    /// The answer to a request whose key check failed: its 401, or the 429 once the client's
    /// address has spent its tokens on failures, so keys cannot be guessed faster than the rate.
    func answerToFailedKeyCheck(_ error: OpenAIError, address: String) -> OpenAIError {
        refusal(client: nil, address: address) ?? error
    }

    static func format(_ rate: Double) -> String {
        rate == rate.rounded() && abs(rate) < 1e15 ? String(Int(rate)) : String(rate)
    }
}
