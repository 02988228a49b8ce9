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
        /// The service group runs: a signal the watch takes now shuts it down (`waitAfterHandOver`).
        var handedOver = false
        var finished = false
        var waiter: CheckedContinuation<Void, Never>?
        var watcher: Task<Void, Never>?
        var timer: Task<Void, Never>?
    }
    private let state = Mutex(State())

    /// A watch whose signal handling is in place when this returns (SIGTERM and SIGINT no longer
    /// end the process by their default action).
    static func start(logger: Logger, patience: Double, exitNow: @escaping @Sendable () -> Void) async -> StartupSignalWatch {
        StartupSignalWatch(signals: await UnixSignalsSequence(trapping: .sigterm, .sigint), logger: logger, patience: patience, exitNow: exitNow)
    }

    /// - Parameters:
    ///   - signals: the SIGTERMs and SIGINTs, as they come (tests give their own).
    ///   - exitNow: ends the process without waiting for anything (it must not return).
    init<Signals: AsyncSequence<UnixSignal, Never> & Sendable>(
        signals: Signals, logger: Logger, patience: Double, exitNow: @escaping @Sendable () -> Void
    ) {
        // The watch lives until `finish()` cancels this task (a cycle it breaks).
        let watcher = Task { [self] in
            var seen = 0
            for await signal in signals {
                seen += 1
                let handedOver = state.withLock { state in
                    if state.signalledAt == nil { state.signalledAt = .now }
                    guard state.handedOver else { return false }
                    state.waiter?.resume()
                    state.waiter = nil
                    return true
                }
                // The service group shuts down; a second signal is its to count.
                if handedOver { continue }
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
                self.state.withLock { $0.timer = timer }
            }
        }
        state.withLock { $0.watcher = watcher }
    }

    /// Whether a signal asked start-up to stop.
    var stopRequested: Bool { state.withLock { $0.signalledAt != nil } }

    /// Seconds since the signal that asked start-up to stop (nil: none did).
    var secondsSinceSignal: Double? { state.withLock { $0.signalledAt.map { (ContinuousClock.now - $0).inSeconds } } }

    /// Start-up no longer waits on plugin code: the patience timer is off. A second signal
    /// still exits at once until the hand-over.
    func reachedStoppingPoint() {
        state.withLock {
            $0.reachedStoppingPoint = true
            $0.timer?.cancel()
        }
    }

    /// Called once the service group exists: returns when a signal has come to this watch (before,
    /// or since), or when the watch is finished; the caller then shuts the group down. A signal
    /// can reach the watch alone, just before the group's own handling is in place, and be taken
    /// by the watch's task only after start-up's last look at `stopRequested` (the group once
    /// ran on after such a SIGTERM). Signals after this are the group's to count.
    func waitAfterHandOver() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { state in
                    state.handedOver = true
                    guard state.signalledAt == nil, !state.finished else { return true }
                    state.waiter = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            finish()
        }
    }

    /// Stops watching: the service group is shutting down (or the process is ending).
    func finish() {
        state.withLock {
            $0.finished = true
            $0.reachedStoppingPoint = true
            $0.timer?.cancel()
            $0.watcher?.cancel()
            $0.waiter?.resume()
            $0.waiter = nil
        }
    }
}
