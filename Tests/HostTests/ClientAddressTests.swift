// Unit tests for IP ranges and the client address behind trusted proxies.
import Testing

@testable import Host

@Suite struct ClientAddressTests {
    /// The bytes of an address the test knows to be valid.
    private func ip(_ text: String) -> [UInt8] { IPRange.parse(text) ?? [] }

    @Test func rangesParseAndContain() throws {
        let private10 = try #require(IPRange("10.0.0.0/8"))
        #expect(private10.contains(ip("10.200.3.4")) && !private10.contains(ip("11.0.0.1")))
        let odd = try #require(IPRange("192.168.1.128/25"))
        #expect(odd.contains(ip("192.168.1.200")) && !odd.contains(ip("192.168.1.127")))
        let loopback6 = try #require(IPRange("::1"))
        #expect(loopback6.contains(ip("::1")) && !loopback6.contains(ip("::2")) && !loopback6.contains(ip("127.0.0.1")))
        // An IPv4-mapped IPv6 peer (a dual-stack socket) is its IPv4 address.
        #expect(try #require(IPRange("127.0.0.1")).contains(ip("::ffff:127.0.0.1")))
        #expect(try #require(IPRange("0.0.0.0/0")).contains(ip("8.8.8.8")))
        for wrong in ["10.0.0.0/33", "::1/129", "10.0.0", "example.com", "10.0.0.1/", "/8", ""] {
            #expect(IPRange(wrong) == nil, "\(wrong)")
        }
    }

    @Test func forwardedForIsReadFromTheRightAndOnlyFromTrustedProxies() {
        let resolver = ClientAddressResolver(trustedProxies: ["127.0.0.1", "10.0.0.0/8"].compactMap(IPRange.init))
        // A trusted peer: the rightmost address that is not a trusted proxy.
        #expect(resolver.clientAddress(peer: "127.0.0.1", forwardedFor: ["203.0.113.9"]) == "203.0.113.9")
        #expect(resolver.clientAddress(peer: "127.0.0.1", forwardedFor: ["6.6.6.6, 203.0.113.9, 10.1.1.1"]) == "203.0.113.9")
        #expect(resolver.clientAddress(peer: "127.0.0.1", forwardedFor: ["6.6.6.6", "203.0.113.9 , 10.1.1.1"]) == "203.0.113.9")
        // Every hop trusted: the leftmost. Garbage stops the walk at the last good address.
        #expect(resolver.clientAddress(peer: "127.0.0.1", forwardedFor: ["10.0.0.2, 10.0.0.3"]) == "10.0.0.2")
        #expect(resolver.clientAddress(peer: "127.0.0.1", forwardedFor: ["203.0.113.9, unknown, 10.0.0.3"]) == "10.0.0.3")
        #expect(resolver.clientAddress(peer: "127.0.0.1", forwardedFor: ["bogus"]) == "127.0.0.1")
        // An untrusted peer's header means nothing, and neither does any header without trusted proxies.
        #expect(resolver.clientAddress(peer: "198.51.100.1", forwardedFor: ["203.0.113.9"]) == "198.51.100.1")
        #expect(ClientAddressResolver(trustedProxies: []).clientAddress(peer: "127.0.0.1", forwardedFor: ["203.0.113.9"]) == "127.0.0.1")
        // Hops with the port some proxies append (Azure's gateway; RFC 7239's bracketed IPv6).
        #expect(resolver.clientAddress(peer: "127.0.0.1", forwardedFor: ["203.0.113.9:51234"]) == "203.0.113.9")
        #expect(resolver.clientAddress(peer: "127.0.0.1", forwardedFor: ["[2001:db8::7]:443, 10.0.0.3:80"]) == "2001:db8::7")
        #expect(resolver.clientAddress(peer: "127.0.0.1", forwardedFor: ["2001:db8::7"]) == "2001:db8::7")  // bare IPv6 is no port
        #expect(resolver.clientAddress(peer: "127.0.0.1", forwardedFor: ["203.0.113.9:http"]) == "127.0.0.1")
    }

    @Test func trustedProxiesComeFromYAMLOrTheEnvironmentAndBadOnesNameTheKey() {
        var config = GatehouseConfig()
        #expect(config.trustedProxies.isEmpty)
        #expect(config.apply(yaml: "server: {trusted_proxies: [127.0.0.1, '10.0.0.0/8']}\n", file: "g.yaml").isEmpty)
        #expect(config.trustedProxies == ["127.0.0.1", "10.0.0.0/8"])
        #expect(config.apply(environment: ["GATEHOUSE_TRUSTED_PROXIES": "::1, 172.16.0.0/12"]).isEmpty)
        #expect(config.trustedProxies == ["::1", "172.16.0.0/12"])
        let yaml = config.apply(yaml: "server: {trusted_proxies: [10.0.0.0/40]}\n", file: "g.yaml").map(\.description)
        #expect(yaml.contains { $0.contains("key 'server.trusted_proxies': '10.0.0.0/40' is not an IP address or CIDR range") })
        let env = config.apply(environment: ["GATEHOUSE_TRUSTED_PROXIES": "proxy.local"]).map(\.description)
        #expect(env.contains { $0.contains("key 'GATEHOUSE_TRUSTED_PROXIES': must be IP addresses or CIDR ranges separated by commas ('proxy.local' is neither)") })
    }
}

@Suite struct CORSPolicyTests {
    @Test func originsAreSchemeHostAndPortOrAStar() {
        for valid in ["*", "https://app.example.com", "http://localhost:3000", "http://[::1]:8080", "chrome-extension://abcdef"] {
            #expect(CORSPolicy.isValidEntry(valid), "\(valid)")
        }
        for invalid in ["app.example.com", "https://app.example.com/", "https://a/b", "https://", "://x", "https://user@x", ""] {
            #expect(!CORSPolicy.isValidEntry(invalid), "\(invalid)")
        }
    }

    @Test func allowsListedOriginsCaseInsensitivelyAndEchoesThem() throws {
        #expect(CORSPolicy(origins: []) == nil)
        let policy = try #require(CORSPolicy(origins: ["https://App.example.com"]))
        #expect(policy.allowedOrigin("https://app.EXAMPLE.com") == "https://app.EXAMPLE.com")
        #expect(policy.allowedOrigin("https://other.example.com") == nil && policy.allowedOrigin(nil) == nil)
        #expect(try #require(CORSPolicy(origins: ["http://a", "*"])).allowedOrigin("https://anything") == "*")
        var fields: [String] = []
        policy.responseFields(origin: "https://evil") { fields.append("\($0): \($1)") }
        #expect(fields == ["Vary: Origin"])
    }

    @Test func configReadsOriginsFromYAMLAndTheEnvironmentAndNamesABadOne() {
        var config = GatehouseConfig()
        #expect(config.apply(yaml: "server: {cors_origins: [\"https://a.example\", \"http://b:1, http://c\"]}\n", file: "g.yaml").isEmpty)
        #expect(config.corsOrigins == ["https://a.example", "http://b:1", "http://c"])
        #expect(config.apply(environment: ["GATEHOUSE_CORS_ORIGINS": " * "]).isEmpty && config.corsOrigins == ["*"])
        let yaml = config.apply(yaml: "server: {cors_origins: [\"https://a.example/\"]}\n", file: "g.yaml").map(\.description)
        #expect(yaml.count == 1 && yaml[0].contains("server.cors_origins") && yaml[0].contains("'https://a.example/' is not a web origin"))
        let environment = config.apply(environment: ["GATEHOUSE_CORS_ORIGINS": "a.example"]).map(\.description)
        #expect(environment.count == 1 && environment[0].contains("GATEHOUSE_CORS_ORIGINS") && environment[0].contains("'a.example'"))
    }
}
