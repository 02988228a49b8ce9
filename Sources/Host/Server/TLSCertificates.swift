// The TLS certificate and key, read at start-up and again on SIGHUP, so a renewed certificate is served without a restart.
internal import Foundation
internal import HummingbirdCore
internal import Logging
internal import NIOCore
internal import NIOSSL
internal import Synchronization

/// The server's TLS context. A reload builds a whole new one from the files and swaps it in;
/// each new connection takes the current one, connections already open keep theirs. A reload
/// that fails (a file missing, unreadable, not PEM, a key that does not match the certificate,
/// or a certificate outside its validity period) leaves the served certificate as it was.
final class TLSCertificates: Sendable {
    let certFile: String
    let keyFile: String
    private let current: Mutex<NIOSSLContext>

    /// Reads the files; a failure is the start-up error naming the file and what is wrong. A
    /// certificate outside its validity period is served (nothing else is there to serve), with
    /// a warning: clients that check it refuse it.
    init(certFile: String, keyFile: String, logger: Logger) throws(StartupError) {
        self.certFile = certFile
        self.keyFile = keyFile
        let loaded = try Self.context(certFile: certFile, keyFile: keyFile)
        current = Mutex(loaded.context)
        if let problem = Self.validityProblem(notBefore: loaded.notBefore, notAfter: loaded.notAfter) {
            logger.warning("TLS certificate \(problem): clients that check certificates will refuse it", metadata: ["cert_file": .string(certFile)])
        }
    }

    /// The context new connections are served with.
    var context: NIOSSLContext { current.withLock { $0 } }

    /// Reads the files again and serves what they hold from the next connection on.
    /// - Returns: when the new certificate expires (for the log).
    /// - Throws: why the files could not be used (an expired certificate among the reasons:
    ///   copied over the served one by mistake, it would be refused by every client that checks);
    ///   the served certificate stays.
    func reload() throws(StartupError) -> Date {
        let loaded = try Self.context(certFile: certFile, keyFile: keyFile)
        if let problem = Self.validityProblem(notBefore: loaded.notBefore, notAfter: loaded.notAfter) {
            throw StartupError("TLS certificate \(certFile) \(problem)")
        }
        current.withLock { $0 = loaded.context }
        return loaded.notAfter
    }

    /// What is wrong with a certificate's validity period now, or nil when it is valid.
    static func validityProblem(notBefore: Date, notAfter: Date) -> String? {
        let now = Date()
        if now > notAfter { return "expired at \(notAfter.formatted(.iso8601))" }
        if now < notBefore { return "is not valid until \(notBefore.formatted(.iso8601))" }
        return nil
    }

    private static func context(certFile: String, keyFile: String) throws(StartupError) -> (context: NIOSSLContext, notBefore: Date, notAfter: Date) {
        let chain: [NIOSSLCertificate]
        let key: NIOSSLPrivateKey
        // NIOSSL's errors are bare names (failedToLoadCertificate): the file's own problem, if
        // it has one, is what an operator needs, else what the contents failed to be.
        do {
            chain = try NIOSSLCertificate.fromPEMFile(certFile)
        } catch {
            throw StartupError("cannot load TLS certificate \(certFile): \(FileProblem.of(certFile) ?? "not a PEM certificate (\(error))")")
        }
        guard let leaf = chain.first else { throw StartupError("TLS certificate file \(certFile) holds no certificate") }
        do {
            key = try NIOSSLPrivateKey(file: keyFile, format: .pem)
        } catch {
            throw StartupError("cannot load TLS private key \(keyFile): \(FileProblem.of(keyFile) ?? "not an unencrypted PEM private key (\(error))")")
        }
        var configuration = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
        // How long a closing connection waits for the client's close_notify (NIOSSL's default is
        // 5 s): clients that never read an idle pooled connection (urllib3) never send one, and
        // each added 5 s to a graceful shutdown.
        configuration.shutdownTimeout = .seconds(1)
        // NIOSSL's default minimum is TLS 1.0; 1.0 and 1.1 are deprecated (RFC 8996), and every
        // client an LLM API has speaks 1.2.
        configuration.minimumTLSVersion = .tlsv12
        do {
            // BoringSSL checks here that the key belongs to the certificate.
            return (
                try NIOSSLContext(configuration: configuration), Date(timeIntervalSince1970: TimeInterval(leaf.notValidBefore)),
                Date(timeIntervalSince1970: TimeInterval(leaf.notValidAfter))
            )
        } catch {
            throw StartupError("cannot use TLS certificate \(certFile) with key \(keyFile): the key is not the certificate's (\(error))")
        }
    }

}

/// TLS in front of the base channel, with the context current when the connection is accepted
/// (HummingbirdTLS's `TLSChannel` fixes its context when the server starts), and in front of
/// TLS the answer to plain HTTP sent to this port (`PlainHTTPDetector`).
struct ReloadableTLSChannel<Base: ServerChildChannel>: ServerChildChannel {
    typealias Value = Base.Value
    let base: Base
    let certificates: TLSCertificates
    /// For the plain-HTTP detector's log line and count.
    let serverLogger: Logger
    let metrics: GatehouseMetrics?

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandlers(PlainHTTPDetector(logger: serverLogger, metrics: metrics), NIOSSLServerHandler(context: certificates.context))
        }.flatMap {
            base.setup(channel: channel, logger: logger)
        }
    }

    func handle(value: Value, logger: Logger) async {
        await base.handle(value: value, logger: logger)
    }
}
