// API-key authentication: X-API-Key or Authorization: Bearer, compared in constant time.
internal import Crypto
internal import Foundation
public import Hummingbird
internal import HTTPTypes

/// Rejects requests without the configured API key (401, OpenAI-shaped). Health endpoints are
/// exempt so load balancers can probe. The key is never logged.
public struct AuthMiddleware: RouterMiddleware {
    public typealias Context = GatehouseRequestContext
    private let expectedDigest: [UInt8]?

    public init(apiKey: String?) {
        expectedDigest = apiKey.map { Array(SHA256.hash(data: Data($0.utf8))) }
    }

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var context = context
        let presented = Self.presentedKey(request.headers)
        if let presented {
            // Rate limiting keys on the client's key without keeping the key itself.
            context.clientID = "key:" + SHA256.hash(data: Data(presented.utf8)).prefix(8).map { String(format: "%02x", $0) }.joined()
        }
        guard let expectedDigest, !Self.isExempt(request.uri.path) else { return try await next(request, context) }
        guard let presented else {
            throw Self.unauthorized("missing API key: send it as X-API-Key or Authorization: Bearer", code: "missing_api_key")
        }
        guard Self.constantTimeEqual(Array(SHA256.hash(data: Data(presented.utf8))), expectedDigest) else {
            throw Self.unauthorized("invalid API key", code: "invalid_api_key")
        }
        return try await next(request, context)
    }

    static func isExempt(_ path: String) -> Bool {
        path == "/health" || path.hasPrefix("/health/")
    }

    /// The key from `X-API-Key`, or from `Authorization: Bearer …` (scheme case-insensitive).
    static func presentedKey(_ headers: HTTPFields) -> String? {
        if let key = headers[HTTPField.Name("X-API-Key")!], !key.isEmpty { return key }
        guard let authorization = headers[.authorization] else { return nil }
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
        var error = OpenAIError(.unauthorized, message, code: code)
        error.headers[.wwwAuthenticate] = "Bearer"
        return error
    }
}
