// Per-request state shared by the gateway's middleware and routes.
public import Hummingbird
internal import NIOCore

/// The request context every Gatehouse route and middleware sees.
public struct GatehouseRequestContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    /// X-Request-ID of this request (the client's, or one we generated).
    public var requestID = ""
    /// Remote IP address, for rate limiting when there is no API key.
    public var remoteAddress: String
    /// The client's identity for rate limiting: a digest of its API key, when it sent one.
    public var clientID: String?
    /// The client connection (for `ClientDeparture.of`).
    let channel: any Channel

    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
        remoteAddress = source.channel.remoteAddress?.ipAddress ?? "unknown"
    }
}
