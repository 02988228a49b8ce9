// Gives every request an id (the client's X-Request-ID or a new one) and echoes it back.
public import Hummingbird
internal import HTTPTypes
internal import Synchronization

/// Honours a sane client `X-Request-ID`, otherwise generates one; sets it on the context,
/// on the logger (so every log line of the request carries it) and on the response.
public struct RequestIDMiddleware: RouterMiddleware {
    public typealias Context = GatehouseRequestContext
    public init() {}

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var context = context
        let id = Self.requestID(for: request.headers)
        context.requestID = id
        context.logger[metadataKey: "request_id"] = .string(id)
        context.logger[metadataKey: "hb.request.id"] = nil
        // AccessLogMiddleware (next in line) turns every error into a response, so this sees
        // only responses.
        var response = try await next(request, context)
        response.headers[.requestID] = id
        return response
    }

    /// The client's X-Request-ID when acceptable, else a new one.
    static func requestID(for headers: HTTPFields) -> String {
        requestID(clientValue: headers[.requestID])
    }

    /// The client's X-Request-ID value when acceptable, else a new id.
    static func requestID(clientValue: String?) -> String {
        clientValue.flatMap { isAcceptable($0) ? $0 : nil } ?? RequestIDGenerator.next()
    }

    /// Ids are echoed into headers and logs: accept only short, printable, header-safe ones,
    /// and none the log would mask as a secret (`sk-…`), or the logged id would not be the one
    /// the client and the upstream were given.
    static func isAcceptable(_ id: String) -> Bool {
        !id.isEmpty && id.utf8.count <= 128 && id.utf8.allSatisfy { $0 > 0x20 && $0 < 0x7f } && Redactor.redact(text: id) == id
    }
}

extension HTTPField.Name {
    static let requestID = HTTPField.Name("X-Request-ID")!
}

/// New request ids: UUID-shaped (version 4 layout), unique within the process and unpredictable
/// across processes, without the system calls Foundation's `UUID()` makes for every id (it
/// opened /dev/urandom each time: three system calls per request on the hot path).
enum RequestIDGenerator {
    private static let seeds = (UInt64.random(in: .min ... .max), UInt64.random(in: .min ... .max))
    private static let counter = Atomic<UInt64>(0)

    static func next() -> String {
        let sequence = counter.wrappingAdd(1, ordering: .relaxed).newValue
        // SplitMix64 is a bijection, so distinct sequence numbers give distinct ids.
        let high = (mix(seeds.0 &+ sequence) & ~0xF000) | 0x4000  // version 4
        let low = (mix(seeds.1 &+ sequence) & ~(0b11 << 62)) | (0b10 << 62)  // RFC 4122 variant
        // Written straight into the string's storage (one allocation, not an array and a copy).
        return String(unsafeUninitializedCapacity: 36) { text in
            var position = 0
            for nibble in 0..<32 {
                if nibble == 8 || nibble == 12 || nibble == 16 || nibble == 20 {
                    text[position] = UInt8(ascii: "-")
                    position += 1
                }
                let word = nibble < 16 ? high : low
                let shift = UInt64(60 - (nibble % 16) * 4)
                text[position] = Hex.digit(Int((word >> shift) & 0xF))
                position += 1
            }
            return position
        }
    }

    private static func mix(_ value: UInt64) -> UInt64 {
        var z = value &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
