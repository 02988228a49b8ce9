// Answers `Expect: 100-continue` with `100 Continue`, so clients that ask (curl, for bodies over 1 MB) send their body at once.
internal import NIOCore
internal import NIOHTTP1

extension HTTPRequestHead {
    /// Whether the client waits for `100 Continue` before sending the body, and should be sent
    /// one: an HTTP/1.1 request with `Expect: 100-continue` that does not declare a body longer
    /// than `maxBodyBytes`. Such a body would be refused anyway; without the invitation the client
    /// sends it after its own wait (curl: 1 s), and gets its 413 then.
    func shouldContinue(maxBodyBytes: Int) -> Bool {
        guard version.major == 1, version.minor >= 1 else { return false }  // never to HTTP/1.0 (RFC 9110, 10.1.1)
        guard headers.contains(name: "Expect"),
            headers[canonicalForm: "Expect"].contains(where: { $0.lowercased() == "100-continue" })
        else { return false }
        if let length = headers.first(name: "Content-Length").flatMap(Int.init), length > maxBodyBytes { return false }
        return true
    }
}

/// Sends `100 Continue` for the requests the router serves, when they ask for it.
///
/// NIO's HTTP/1 server codec leaves `Expect` to the application and Hummingbird does not answer
/// it, so without this a client that asks waits for its own timeout before sending the body.
/// An interim answer must not land inside another response: a request read while an earlier
/// response is still being written (a pipelining client, or one that sent its next request as
/// soon as it had the last body byte, before the router wrote the response's end) gets its
/// `100` when that response has ended.
final class ExpectContinueHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private let maxBodyBytes: Int
    /// The requests read whose responses have not ended, oldest first: the HTTP version of each
    /// that still waits for its `100`, nil for the others.
    private var unanswered = CircularBuffer<HTTPVersion?>()

    init(maxBodyBytes: Int) {
        self.maxBodyBytes = maxBodyBytes
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .head(let head) = unwrapInboundIn(data) {
            unanswered.append(head.shouldContinue(maxBodyBytes: maxBodyBytes) ? head.version : nil)
            if unanswered.count == 1 { sendContinueIfAwaited(context) }
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .head(let head) where head.status.code >= 200 || head.status == .switchingProtocols:
            // A final answer written without reading the body (an early 401, say): no 100 now.
            if !unanswered.isEmpty { unanswered[unanswered.startIndex] = nil }
            context.write(data, promise: promise)
        case .end:
            context.write(data, promise: promise)
            if !unanswered.isEmpty {
                unanswered.removeFirst()
                sendContinueIfAwaited(context)
            }
        default:
            context.write(data, promise: promise)
        }
    }

    /// The `100` of the oldest unanswered request, if it is owed one.
    private func sendContinueIfAwaited(_ context: ChannelHandlerContext) {
        guard let version = unanswered.first ?? nil else { return }
        unanswered[unanswered.startIndex] = nil
        context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: version, status: .continue))), promise: nil)
    }
}
