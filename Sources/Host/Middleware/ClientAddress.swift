// The client's address behind trusted reverse proxies: X-Forwarded-For, read from the right, only from proxies we trust.
internal import Foundation
internal import HTTPTypes
internal import Hummingbird
#if canImport(Glibc)
internal import Glibc
#endif

/// An IPv4 or IPv6 address, or a CIDR range of them (`10.0.0.0/8`, `::1`, `fd00::/8`).
struct IPRange: Sendable, Equatable {
    /// 4 bytes (IPv4) or 16 (IPv6); IPv4-mapped IPv6 addresses are kept as IPv4.
    let bytes: [UInt8]
    let prefixLength: Int

    /// Nil unless `text` is an address, optionally with `/prefix` within its family's size.
    init?(_ text: String) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let address = Self.parse(String(parts[0])) else { return nil }
        let bits = address.count * 8
        if parts.count == 2 {
            guard let length = Int(parts[1]), (0...bits).contains(length) else { return nil }
            prefixLength = length
        } else {
            prefixLength = bits
        }
        bytes = address
    }

    /// Whether `address` (as `parse` returns it) lies in this range.
    func contains(_ address: [UInt8]) -> Bool {
        guard address.count == bytes.count else { return false }
        var left = prefixLength
        for (mine, theirs) in zip(bytes, address) where left > 0 {
            let mask: UInt8 = left >= 8 ? 0xFF : ~(0xFF >> UInt8(left))
            guard mine & mask == theirs & mask else { return false }
            left -= 8
        }
        return true
    }

    /// The address's bytes (IPv4-mapped IPv6 as IPv4), or nil if it is not an IP address.
    static func parse(_ text: String) -> [UInt8]? {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            return withUnsafeBytes(of: &v4) { Array($0) }
        }
        var v6 = in6_addr()
        guard inet_pton(AF_INET6, text, &v6) == 1 else { return nil }
        let bytes = withUnsafeBytes(of: &v6) { Array($0) }
        if bytes[0..<10].allSatisfy({ $0 == 0 }), bytes[10] == 0xFF, bytes[11] == 0xFF { return Array(bytes[12...]) }
        return bytes
    }
}

/// Decides which address a request comes from. With no trusted proxies (the default), it is
/// the connection's peer, and `X-Forwarded-For` is ignored (anyone can send it). When the peer
/// is a trusted proxy, the client is the rightmost address in `X-Forwarded-For` that is not a
/// trusted proxy itself (each proxy appends the address it saw, so everything left of that
/// could have been made up by the client); if every one is trusted, the leftmost.
struct ClientAddressResolver: Sendable {
    let trustedProxies: [IPRange]

    var isEnabled: Bool { !trustedProxies.isEmpty }

    /// - Parameters:
    ///   - peer: the connection's remote IP address, as text.
    ///   - forwardedFor: every `X-Forwarded-For` field value, in order.
    func clientAddress(peer: String, forwardedFor: [String]) -> String {
        guard isEnabled, !forwardedFor.isEmpty, isTrusted(peer) else { return peer }
        let hops = forwardedFor.flatMap { $0.split(separator: ",") }.map { Self.withoutPort($0.trimmingCharacters(in: .whitespaces)) }
        var client = peer
        for hop in hops.reversed() {
            guard IPRange.parse(hop) != nil else { break }  // garbage: trust nothing further left
            client = hop
            if !isTrusted(hop) { break }
        }
        return client
    }

    /// A hop without the port some proxies append (Azure's Application Gateway writes
    /// `203.0.113.7:51234`, RFC 7239's style `[2001:db8::1]:443`), which would otherwise not
    /// parse and end the walk at the proxy, putting every client in the proxy's rate bucket.
    static func withoutPort(_ hop: String) -> String {
        if hop.hasPrefix("["), let close = hop.firstIndex(of: "]") {
            return String(hop[hop.index(after: hop.startIndex)..<close])
        }
        let parts = hop.split(separator: ":", omittingEmptySubsequences: false)
        if parts.count == 2, parts[1].allSatisfy(\.isNumber), IPRange.parse(String(parts[0])) != nil { return String(parts[0]) }
        return hop
    }

    private func isTrusted(_ address: String) -> Bool {
        guard let bytes = IPRange.parse(address) else { return false }
        return trustedProxies.contains { $0.contains(bytes) }
    }
}

/// Replaces the request context's address with the client's behind trusted proxies (added
/// first, before anything reads the address: rate limits, key-check charges, the access log).
struct ClientAddressMiddleware: RouterMiddleware {
    typealias Context = GatehouseRequestContext
    let resolver: ClientAddressResolver
    static let forwardedFor = HTTPField.Name("X-Forwarded-For")!

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var context = context
        context.remoteAddress = resolver.clientAddress(peer: context.remoteAddress, forwardedFor: request.headers[values: Self.forwardedFor])
        return try await next(request, context)
    }
}
