// SIGTERM and SIGINT while plugins load: stop once the plugin being initialised returns.
internal import Foundation
internal import Logging
internal import ServiceLifecycle
internal import Synchronization
internal import UnixSignals

/// Watches for SIGTERM and SIGINT from before the plugins load until the service group traps
/// them itself. Without it, a signal in that span ended the process by the default action: the
/// plugins already initialised got no `shutdown`, and their private library copies stayed behind.
///
/// A first signal asks start-up to stop at the next plugin (native code in an `init` cannot be
/// interrupted, so the one being initialised finishes first). If start-up has not reached that
/// point within `patience` (`server.shutdown_timeout`), or a second signal comes, the process
/// exits at once, as the default action would have, having removed the private copies.
final class StartupSignalWatch: Sendable {
    private struct State {
        var signalledAt: ContinuousClock.Instant?
        /// Start-up stopped waiting on plugins' `init`: the patience timer no longer applies.
        var reachedStoppingPoint = false
        var watcher: Task<Void, Never>?
        var timer: Task<Void, Never>?
    }
    private let state = Mutex(State())

    /// - Parameter exitNow: ends the process without waiting for anything (it must not return).
    init(logger: Logger, patience: Double, exitNow: @escaping @Sendable () -> Void) {
        // The watch lives until `finish()` cancels this task (a cycle it breaks).
        let watcher = Task { [self] in
            var seen = 0
            for await signal in await UnixSignalsSequence(trapping: .sigterm, .sigint) {
                seen += 1
                guard seen == 1 else {
                    logger.warning("second signal during start-up: exiting now, without shutting plugins down", metadata: ["signal": .string("\(signal)")])
                    exitNow()
                    return
                }
                logger.info(
                    "signal during start-up: stopping once the plugin being initialised returns",
                    metadata: ["signal": .string("\(signal)"), "wait_limit_s": .string(String(format: "%.3f", patience))])
                let timer = Task {
                    try? await Task.sleep(for: .milliseconds(Int64(patience * 1000)))
                    guard !Task.isCancelled, !self.state.withLock({ $0.reachedStoppingPoint }) else { return }
                    logger.error("a plugin's init did not return within server.shutdown_timeout of the signal; exiting without shutting plugins down")
                    exitNow()
                }
                self.state.withLock {
                    $0.signalledAt = .now
                    $0.timer = timer
                }
            }
        }
        state.withLock { $0.watcher = watcher }
    }

    /// Whether a signal asked start-up to stop.
    var stopRequested: Bool { state.withLock { $0.signalledAt != nil } }

    /// Seconds since the signal that asked start-up to stop (nil: none did).
    var secondsSinceSignal: Double? { state.withLock { $0.signalledAt.map { (ContinuousClock.now - $0).inSeconds } } }

    /// Start-up no longer waits on plugin code: the patience timer is off. A second signal
    /// still exits at once until `finish()`.
    func reachedStoppingPoint() {
        state.withLock {
            $0.reachedStoppingPoint = true
            $0.timer?.cancel()
        }
    }

    /// Stops watching: the service group traps the signals now (or the process is ending).
    /// Returns whether a signal asked start-up to stop.
    @discardableResult
    func finish() -> Bool {
        state.withLock {
            $0.reachedStoppingPoint = true
            $0.timer?.cancel()
            $0.watcher?.cancel()
            return $0.signalledAt != nil
        }
    }
}

/// The hand-over from `StartupSignalWatch` to the service group, which traps SIGTERM and SIGINT
/// before it starts its services: a signal the watch caught after start-up's last look (while
/// the routes were being built) shuts the group down as soon as it runs.
struct StartupSignalHandOver: Service {
    let watch: StartupSignalWatch

    func run() async throws {
        if watch.finish() { return }
        try? await gracefulShutdown()
    }
}
