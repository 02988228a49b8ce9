// SIGHUP: reopen the log file (after a rotation) and reload the TLS certificate, without a restart.
internal import Foundation
internal import Logging
internal import ServiceLifecycle
internal import UnixSignals

/// On each SIGHUP (what `systemctl reload`, logrotate's `postrotate` and certbot's deploy hooks
/// send): reopens the log file, so lines go to the file now at its path rather than to the one
/// a rotation renamed, then reads the TLS certificate and key again. Each outcome is logged
/// (into the reopened file). Either way SIGHUP no longer ends the process, its default action.
struct ReloadOnHangup: Service {
    /// The log file to reopen; nil or standard output: nothing to reopen.
    let logSink: LogSink?
    let certificates: TLSCertificates?
    let logger: Logger

    func run() async throws {
        for await _ in await UnixSignalsSequence(trapping: .sighup).cancelOnGracefulShutdown() {
            reopenLog()
            reloadCertificates()
        }
    }

    private func reopenLog() {
        guard let logSink, let path = logSink.path else { return }
        do {
            try logSink.reopen()
            logger.notice("SIGHUP: reopened the log file", metadata: ["log_file": .string(path)])
        } catch {
            logger.error("SIGHUP: log file not reopened; still writing to the one open", metadata: ["error": .string("\(error)")])
        }
    }

    private func reloadCertificates() {
        guard let certificates else {
            logger.notice(
                logSink?.path == nil
                    ? "SIGHUP: nothing to reload (no log file, TLS is off; other settings take a restart)"
                    : "SIGHUP: no TLS certificate to reload (TLS is off; other settings take a restart)")
            return
        }
        do {
            let expires = try certificates.reload()
            logger.notice(
                "SIGHUP: reloaded the TLS certificate; new connections get it",
                metadata: ["cert_file": .string(certificates.certFile), "expires": .string(expires.formatted(.iso8601))])
        } catch {
            logger.error("SIGHUP: TLS certificate not reloaded; still serving the previous one", metadata: ["error": .string(error.description)])
        }
    }
}
