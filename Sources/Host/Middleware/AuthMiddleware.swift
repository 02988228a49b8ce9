// API-key authentication: X-API-Key or Authorization: Bearer, compared in constant time.
internal import Crypto
internal import Foundation
public import Hummingbird
internal import HTTPTypes

/// The API-key rule, shared by the router middleware and the chat pass-through: health
/// endpoints are exempt so load balancers can probe; the key is never logged or kept.
struct APIKeyCheck: Sendable {
    private let expectedDigest: [UInt8]?
    /// The rate-limit identity of the configured key's holders (a digest prefix, not the key).
    private let keyClientID: String?

    init(apiKey: String?) {
        expectedDigest = apiKey.map { Array(SHA256.hash(data: Data($0.utf8))) }
        keyClientID = expectedDigest.map { "key:" + Hex.string($0.prefix(8)) }
    }

    /// Whether a key is configured (so requests outside `/health` must present it).
    var isRequired: Bool { expectedDigest != nil }

    /// Checks the request's key and returns the client's rate-limit identity: the configured
    /// key's (its holders share one bucket) when the key was required and presented, nil
    /// otherwise, so limits fall back to the client's address. A key nobody checks names no
    /// one: a client could send a fresh one with every request to get a fresh bucket.
    ///
    /// Each failed check costs the client's address a token of `limiter`, so keys cannot be
    /// guessed faster than the rate limit: once the address has none left, the 429 is thrown
    /// instead of the 401 (`RateLimiter.answerToFailedKeyCheck`).
    /// - Throws: a 401 `OpenAIError` when a key is configured and the request lacks it.
    func verify(_ headers: HTTPFields, path: String, chargingFailuresTo limiter: RateLimiter?, address: String) throws(OpenAIError) -> String? {
        guard isRequired else { return nil }
        return try verify(
            apiKeyHeader: headers[Self.apiKeyField], authorization: headers[.authorization], path: path, chargingFailuresTo: limiter,
            address: address)
    }

    /// `verify` on the two header values (for callers that hold other header types).
    func verify(
        apiKeyHeader: String?, authorization: String?, path: String, chargingFailuresTo limiter: RateLimiter?, address: String
    ) throws(OpenAIError) -> String? {
        do {
            return try check(apiKeyHeader: apiKeyHeader, authorization: authorization, path: path)
        } catch {
            throw limiter?.answerToFailedKeyCheck(error, address: address) ?? error
        }
    }

    private func check(apiKeyHeader: String?, authorization: String?, path: String) throws(OpenAIError) -> String? {
        guard let expectedDigest, !Self.isExempt(path) else { return nil }
        guard let presented = Self.presentedKey(apiKeyHeader: apiKeyHeader, authorization: authorization) else {
            throw Self.unauthorized("missing API key: send it as X-API-Key or Authorization: Bearer", code: "missing_api_key")
        }
        // Digests have equal lengths whatever was sent, so the comparison's time says nothing.
        let presentedDigest = Array(SHA256.hash(data: Data(presented.utf8)))
        guard Self.constantTimeEqual(presentedDigest, expectedDigest) else {
            throw Self.unauthorized("invalid API key", code: "invalid_api_key")
        }
        return keyClientID
    }

    static func isExempt(_ path: String) -> Bool {
        path == "/health" || path.hasPrefix("/health/")
    }

    static let apiKeyField = HTTPField.Name("X-API-Key")!

    /// The key from `X-API-Key`, or from `Authorization: Bearer …` (scheme case-insensitive).
    static func presentedKey(apiKeyHeader: String?, authorization: String?) -> String? {
        if let key = apiKeyHeader, !key.isEmpty { return key }
        guard let authorization else { return nil }
        let parts = authorization.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: true)
        guard parts.count == 2, parts[0].lowercased() == "bearer" else { return nil }
        let token = parts[1].trimmingCharacters(in: .whitespaces)
        return token.isEmpty ? nil : token
    }

    /// Compares two equal-length digests without an early exit.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for index in a.indices { difference |= a[index] ^ b[index] }
        return difference == 0
    }

    static func unauthorized(_ message: String, code: String) -> OpenAIError {
        OpenAIError(.unauthorized, message, code: code).with(.wwwAuthenticate, "Bearer")
    }
}

/// Rejects requests without the configured API key (401, OpenAI-shaped); see `APIKeyCheck`.
public struct AuthMiddleware: RouterMiddleware {
    public typealias Context = GatehouseRequestContext
    private let check: APIKeyCheck
    private let limiter: RateLimiter?

    /// - Parameter limiter: charged for each failed key check, by client address.
    init(apiKey: String?, limiter: RateLimiter?) {
        check = APIKeyCheck(apiKey: apiKey)
        self.limiter = limiter
    }

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var context = context
        context.clientID = try check.verify(request.headers, path: request.uri.path, chargingFailuresTo: limiter, address: context.remoteAddress)
        return try await next(request, context)
    }
}

/// Lower-case hexadecimal text of bytes.
enum Hex {
    /// The sixteen digits as ASCII bytes.
    static let digits = Array("0123456789abcdef".utf8)

    /// The lower-case digit for `value` (0-15) as an ASCII byte, computed: the per-request paths
    /// call this in loops, where each read of `digits` would check the global's lazy
    /// initialization.
    @inline(__always)
    static func digit(_ value: Int) -> UInt8 {
        UInt8(truncatingIfNeeded: value < 10 ? 0x30 + value : 0x57 + value)
    }

    static func string(_ bytes: some Sequence<UInt8>) -> String {
        var text: [UInt8] = []
        text.reserveCapacity(64)
        for byte in bytes {
            text.append(digits[Int(byte >> 4)])
            text.append(digits[Int(byte & 0x0f)])
        }
        return String(decoding: text, as: UTF8.self)
    }
}
