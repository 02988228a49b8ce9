// Checks, before anything with side effects starts, that the listen address can be bound.
internal import Foundation
internal import NIOCore

/// A trial `bind(2)` of the listen address, closed again at once.
///
/// Plugins are initialised before the server binds (their routes and middleware must be in place
/// when the first request comes), so without this a second Gatehouse on a busy port would start
/// every plugin, and its background work, only to stop with "address already in use". The probe
/// never calls `listen(2)`, so no client can connect to it and nothing is left half-accepted.
enum ListenAddressProbe {
    /// Throws what binding `host:port` would throw: `SocketAddressError.UnknownHost` for a name
    /// that does not resolve, or an `IOError` carrying the `bind` errno (`EADDRINUSE`, `EACCES`,
    /// `EADDRNOTAVAIL`, `EINVAL`). Port 0 (any free port) is not probed.
    static func check(host: String, port: Int) throws {
        guard port != 0 else { return }
        // Resolved as NIO's ServerBootstrap resolves it, so the probe binds the same address.
        let address = try SocketAddress.makeAddressResolvingHost(host, port: port)
        let family: Int32
        switch address {
        case .v4: family = AF_INET
        case .v6: family = AF_INET6
        case .unixDomainSocket: return
        }
        let descriptor = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { throw IOError(errnoCode: errno, reason: "socket") }
        defer { close(descriptor) }
        // As NIO sets it: without it, a port whose last connections are in TIME_WAIT would look
        // busy although the real bind succeeds. A listening socket still makes bind fail.
        var on: Int32 = 1
        _ = setsockopt(descriptor, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<Int32>.size))
        let result = address.withSockAddr { pointer, size in bind(descriptor, pointer, socklen_t(size)) }
        guard result == 0 else { throw IOError(errnoCode: errno, reason: "bind") }
    }
}
