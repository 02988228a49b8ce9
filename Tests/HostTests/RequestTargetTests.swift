// Unit tests for how request heads are read alike on both paths: slashes merged, repeated fields joined.
import NIOHTTP1
import Testing

@testable import Host

@Suite struct RequestTargetTests {
    @Test func runsOfSlashesInThePathAreMerged() {
        // The router skips empty segments, so these reached the chat route while escaping
        // plugin middleware scoped to `/v1/chat/`.
        #expect(RequestTarget.mergingSlashes("//v1/chat/completions") == "/v1/chat/completions")
        #expect(RequestTarget.mergingSlashes("/v1//chat///completions") == "/v1/chat/completions")
        #expect(RequestTarget.mergingSlashes("/v1/plugins//echo/x//") == "/v1/plugins/echo/x/")
        #expect(RequestTarget.mergingSlashes("http://host//v1/chat/completions") == "http://host/v1/chat/completions")
        // The query is not the path.
        #expect(RequestTarget.mergingSlashes("//v1/models?next=//x") == "/v1/models?next=//x")
        for unchanged in ["/v1/chat/completions", "/v1/models?next=//x", "http://host/v1/models", "/", "*", "host:443", "http://host"] {
            #expect(RequestTarget.mergingSlashes(unchanged) == nil, "\(unchanged)")
        }
    }

    @Test func repeatedFieldsAreJoinedAsTheRouterJoinsThem() {
        let headers = HTTPHeaders([("X-API-Key", "right"), ("Cache-Control", "max-age=60"), ("x-api-key", "wrong"), ("CACHE-CONTROL", "no-cache")])
        #expect(headers.combinedValue("X-API-Key") == "right, wrong")
        #expect(headers.combinedValue("cache-control") == "max-age=60, no-cache")
        #expect(CacheUse(cacheControl: headers.combinedValue("Cache-Control")) == .refresh)
        #expect(headers.combinedValue("Authorization") == nil)
        #expect(HTTPHeaders([("Authorization", "Bearer k")]).combinedValue("authorization") == "Bearer k")
        // The whitespace around a value is not part of it (NIO's parser keeps a trailing space or tab).
        #expect(HTTPHeaders([("X-API-Key", "key \t"), ("x-api-key", "\tother")]).combinedValue("X-API-Key") == "key, other")
        #expect(HTTPHeaders([("Origin", " \t ")]).combinedValue("Origin") == "")
        #expect(HTTPHeaders.trimmingWhitespace("a b") == "a b")
        // Names of the same length that differ only past ASCII letters are not the same.
        #expect(HTTPHeaders([("X-Key^", "a")]).combinedValue("X-Key~") == nil)
    }
}
