// Unit tests for the token bucket, the rate limiter and the response cache, with an injected clock.
import Foundation
import Synchronization
import Testing

@testable import Host

/// A clock the test moves by hand.
final class ManualClock: Sendable {
    private let time = Mutex(1000.0)
    var now: Double { time.withLock { $0 } }
    func advance(_ seconds: Double) { time.withLock { $0 += seconds } }
}

@Suite struct TokenBucketTests {
    @Test func allowsABurstThenRefillsAtTheRate() {
        var bucket = TokenBucket(rate: 2, burst: 3, now: 0)
        #expect(bucket.take(now: 0) == nil)
        #expect(bucket.take(now: 0) == nil)
        #expect(bucket.take(now: 0) == nil)
        let wait = bucket.take(now: 0)
        #expect(wait == 0.5)  // one token at 2 per second
        #expect(bucket.take(now: 0.25) == 0.25)
        #expect(bucket.take(now: 0.5) == nil)
        #expect(bucket.isFull(now: 10))
    }

    @Test func neverHoldsMoreThanTheBurst() {
        var bucket = TokenBucket(rate: 100, burst: 2, now: 0)
        #expect(bucket.take(now: 1000) == nil)
        #expect(bucket.take(now: 1000) == nil)
        #expect(bucket.take(now: 1000) != nil)
    }
}

@Suite struct RateLimiterTests {
    @Test func limitsEachClientSeparately() {
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 1, burst: 2, globalRate: nil, now: { clock.now })
        #expect(limiter.check(client: "a") == nil)
        #expect(limiter.check(client: "a") == nil)
        #expect(limiter.check(client: "a") == 1)
        #expect(limiter.check(client: "b") == nil)
        clock.advance(1)
        #expect(limiter.check(client: "a") == nil)
    }

    @Test func anIPv6ClientIsLimitedByItsSlash64() {
        // One host holds a whole /64 and could take a fresh address (a fresh bucket) per request.
        #expect(RateLimiter.addressBucket("2001:db8:1:2:aaaa::1") == RateLimiter.addressBucket("2001:db8:1:2:ffff:1:2:3"))
        #expect(RateLimiter.addressBucket("2001:db8:1:2::1") == "ip6:2001:db8:1:2::/64")
        #expect(RateLimiter.addressBucket("2001:db8:1:2::1") != RateLimiter.addressBucket("2001:db8:1:3::1"))
        #expect(RateLimiter.addressBucket("::ffff:192.0.2.7") == RateLimiter.addressBucket("192.0.2.7"))
        #expect(RateLimiter.addressBucket("192.0.2.7") == "ip:192.0.2.7" && RateLimiter.addressBucket("192.0.2.8") != "ip:192.0.2.7")
        let limiter = RateLimiter(rate: 1, burst: 1, globalRate: nil)
        #expect(limiter.refusal(client: nil, address: "2001:db8:1:2::1") == nil)
        #expect(limiter.refusal(client: nil, address: "2001:db8:1:2::2") != nil)
    }

    @Test func failedKeyChecksDoNotSpendTheGlobalRate() {
        // Requests without the key, from a few addresses, emptied the global bucket, and every
        // holder of the key got 429s.
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 5, burst: 5, globalRate: 2, now: { clock.now })
        let unauthorized = APIKeyCheck.unauthorized("invalid API key", code: "invalid_api_key")
        for address in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            #expect(limiter.answerToFailedKeyCheck(unauthorized, address: address).status == .unauthorized)
        }
        #expect(limiter.refusal(client: "key", address: "10.0.0.9") == nil)
        #expect(limiter.refusal(client: "key", address: "10.0.0.9") == nil)
        // The global rate (2) is spent now, by the key's holders.
        let refusal = limiter.refusal(client: "key", address: "10.0.0.9")
        #expect(refusal?.status == .tooManyRequests)
        #expect(refusal?.message.hasPrefix("global rate limit exceeded (2 requests/s for all clients together)") == true)
    }

    @Test func aRateOfZeroTurnsThatLimitOff() {
        // `global_requests_per_second: 0` let one request through, then refused all for a year.
        let clock = ManualClock()
        let perClientOnly = RateLimiter(rate: 1, burst: 1, globalRate: 0, now: { clock.now })
        #expect(perClientOnly.globalRate == nil)
        for client in ["a", "b", "c"] { #expect(perClientOnly.refusal(client: client, address: "x") == nil) }
        #expect(RateLimiter.make(requestsPerSecond: 0, burst: nil, globalRequestsPerSecond: 0) == nil)
        #expect(RateLimiter.make(requestsPerSecond: 0, burst: nil, globalRequestsPerSecond: nil) == nil)
        // Only the global limit: no client has a bucket, and everyone together gets 2 a second.
        let globalOnly = RateLimiter(rate: 0, burst: nil, globalRate: 2, now: { clock.now })
        #expect(globalOnly.refusal(client: "a", address: "x") == nil)
        #expect(globalOnly.refusal(client: "a", address: "x") == nil)
        #expect(globalOnly.refusal(client: "b", address: "y")?.status == .tooManyRequests)
        #expect(globalOnly.trackedClients == 0)
        clock.advance(0.5)
        #expect(globalOnly.refusal(client: "b", address: "y") == nil)
    }

    @Test func ratesPrintWithoutTrappingHoweverLarge() {
        #expect(RateLimiter.format(50) == "50")
        #expect(RateLimiter.format(0.5) == "0.5")
        #expect(RateLimiter.format(1e19) == "1e+19")
    }

    @Test func aTinyRateWaitsAYearAtMostInsteadOfTrapping() {
        // RATE_LIMIT_RPS=1e-20 was accepted, and the second request's wait (1e20 s) trapped.
        for rate in [1e-20, Double.leastNonzeroMagnitude] {
            let limiter = RateLimiter(rate: rate, burst: nil, globalRate: nil, now: { 0 })
            #expect(limiter.refusal(client: "a", address: "x") == nil)
            let refusal = limiter.refusal(client: "a", address: "x")
            #expect(refusal?.headers[.retryAfter] == "31536000")
        }
    }

    @Test func failedKeyChecksSpendTheAddressesTokensThenTurnInto429s() {
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 1, burst: 2, globalRate: nil, now: { clock.now })
        let unauthorized = APIKeyCheck.unauthorized("invalid API key", code: "invalid_api_key")
        #expect(limiter.answerToFailedKeyCheck(unauthorized, address: "10.0.0.1").status == .unauthorized)
        #expect(limiter.answerToFailedKeyCheck(unauthorized, address: "10.0.0.1").status == .unauthorized)
        let third = limiter.answerToFailedKeyCheck(unauthorized, address: "10.0.0.1")
        #expect(third.status == .tooManyRequests && third.code == "rate_limit_exceeded")
        #expect(limiter.answerToFailedKeyCheck(unauthorized, address: "10.0.0.2").status == .unauthorized)
        // The key's holders draw on their own bucket.
        #expect(limiter.refusal(client: "key:abc", address: "10.0.0.1") == nil)
    }

    @Test func retryAfterIsLongEnoughForBothLimits() {
        // The client's bucket refused first and said 3 s, though the global one needed 3.3:
        // a client waiting as told was refused again.
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 0.4, burst: 1, globalRate: 0.3, now: { clock.now })
        #expect(limiter.refusal(client: "a", address: "x") == nil)
        #expect(limiter.refusal(client: "a", address: "x")?.headers[.retryAfter] == "4")
        clock.advance(4)
        #expect(limiter.refusal(client: "a", address: "x") == nil)
    }

    @Test func failedKeyChecksAreLimitedByTheGlobalRateWhenThereIsNoClientRate() {
        // With only a global limit, wrong keys could be tried without any limit.
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 0, burst: nil, globalRate: 1, now: { clock.now })
        let unauthorized = APIKeyCheck.unauthorized("invalid API key", code: "invalid_api_key")
        #expect(limiter.answerToFailedKeyCheck(unauthorized, address: "10.0.0.1").status == .unauthorized)
        let second = limiter.answerToFailedKeyCheck(unauthorized, address: "10.0.0.1")
        #expect(second.status == .tooManyRequests && second.message.hasPrefix("rate limit exceeded (1 requests/s)"))
        // Still not at the key's holders' expense.
        #expect(limiter.refusal(client: "key", address: "10.0.0.1") == nil)
    }

    @Test func globalLimitAppliesAcrossClientsWithoutChargingTheRefusedClient() {
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 10, burst: 10, globalRate: 2, now: { clock.now })
        #expect(limiter.check(client: "a") == nil)
        #expect(limiter.check(client: "b") == nil)
        #expect(limiter.check(client: "c") != nil)  // global bucket (burst 2) is empty
        clock.advance(0.5)
        #expect(limiter.check(client: "c") == nil)  // c's own token was given back
    }
}

@Suite struct ResponseCacheTests {
    static func json(_ text: String) -> Data {
        Data(#"{"choices":[{"index":0,"message":{"role":"assistant","content":"\#(text)"}}]}"#.utf8)
    }

    func completion(_ text: String) -> ChatCompletion {
        ChatCompletion(json: Self.json(text), promptTokens: 1, completionTokens: 1)
    }

    @Test func expiresAfterTheTTL() {
        let clock = ManualClock()
        let cache = ResponseCache(limits: .init(maxEntries: 10, maxBytes: 10_000, ttl: 60), now: { clock.now })
        cache.put("k", completion("v"))
        #expect(cache.get("k")?.json == Self.json("v"))
        clock.advance(59)
        #expect(cache.get("k")?.json == Self.json("v"))
        clock.advance(2)
        #expect(cache.get("k") == nil)
        #expect(cache.count == 0 && cache.bytes == 0)
    }

    @Test func evictsTheLeastRecentlyUsedBeyondMaxEntries() {
        let cache = ResponseCache(limits: .init(maxEntries: 2, maxBytes: 10_000, ttl: 60))
        cache.put("a", completion("1"))
        cache.put("b", completion("2"))
        _ = cache.get("a")  // a is now the most recently used
        cache.put("c", completion("3"))
        #expect(cache.get("b") == nil)
        #expect(cache.get("a") != nil)
        #expect(cache.get("c") != nil)
        #expect(cache.count == 2)
    }

    @Test func staysWithinMaxBytes() {
        let entry = completion(String(repeating: "x", count: 100))
        let size = entry.json.count + 1 + ResponseCache.entryOverhead
        let cache = ResponseCache(limits: .init(maxEntries: 100, maxBytes: size * 3, ttl: 60))
        for key in ["a", "b", "c", "d", "e"] { cache.put(key, entry) }
        #expect(cache.count == 3)
        #expect(cache.bytes <= size * 3)
        #expect(cache.get("a") == nil && cache.get("e") != nil)
        cache.put("huge", completion(String(repeating: "y", count: size * 4)))
        #expect(cache.get("huge") == nil)  // larger than the whole cache: not stored
    }

    @Test func replacingAKeyKeepsTheByteCountExact() {
        let cache = ResponseCache(limits: .init(maxEntries: 10, maxBytes: 10_000, ttl: 60))
        cache.put("k", completion("first"))
        let once = cache.bytes
        cache.put("k", completion("first"))
        #expect(cache.bytes == once && cache.count == 1)
    }

    @Test func onlyWholeAnswersAreStored() {
        let cache = ResponseCache(limits: .init(maxEntries: 10, maxBytes: 10_000, ttl: 60))
        let notAnswers = [
            #"{"id":"chatcmpl-1","object":"chat.completion","created""#,  // cut short where the connection closed
            #"{"error":{"message":"overloaded","type":"server_error"}}"#,  // an error sent with a 200
            #"{"choices":[],"error":{"message":"overloaded"}}"#,
            #"{"choices":[{"index":0}],"error":{"message":"overloaded"}}"#,
            #"{"object":"chat.completion"}"#,
            #"[{"choices":[{"index":0}]}]"#,
        ]
        for json in notAnswers {
            #expect(!cache.put("k", ChatCompletion(json: Data(json.utf8), promptTokens: 0, completionTokens: 0)), "\(json)")
            #expect(cache.get("k") == nil)
        }
        #expect(cache.put("k", ChatCompletion(json: Data(#"{"choices":[{"index":0}],"error":null}"#.utf8), promptTokens: 0, completionTokens: 0)))
        #expect(cache.count == 1)
    }

    @Test func aNewerAnswerThatCannotBeStoredStillRemovesTheOldOne() {
        // A refresh (`Cache-Control: no-cache`) whose fresh answer is too large for the cache
        // left the old answer to be served to everyone after it.
        let cache = ResponseCache(limits: .init(maxEntries: 10, maxBytes: 2_000, ttl: 60))
        cache.put("k", completion("old"))
        #expect(!cache.put("k", completion(String(repeating: "n", count: 3_000))))
        #expect(cache.get("k") == nil)
        #expect(cache.count == 0 && cache.bytes == 0)
    }
}

@Suite struct RateLimiterPruningTests {
    @Test func idleClientsAreForgottenOnceTheTableIsLarge() {
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 1, burst: 1, globalRate: nil, now: { clock.now })
        for index in 0...10_000 { #expect(limiter.check(client: "c\(index)") == nil) }
        #expect(limiter.check(client: "c0") != nil)  // still remembered: its bucket is empty
        clock.advance(2)  // every bucket refills, so every client is idle
        #expect(limiter.check(client: "new") == nil)  // the table is pruned here
        #expect(limiter.trackedClients == 1)
    }
}

@Suite struct CustomMetricTests {
    @Test func anAddPastDoublesRangeIsRefusedAndTheValueKept() {
        // Two adds of 1e308 made the value infinite, and the plugin's JSON status a 500.
        for kind in [PluginStats.CustomMetric.Kind.counter, .gauge] {
            let metric = PluginStats.CustomMetric(kind: kind, name: "big", counter: nil, gauge: nil)
            #expect(metric.add(1e308))
            #expect(!metric.add(1e308))
            #expect(metric.value.withLock { $0 } == 1e308)
        }
    }
}
