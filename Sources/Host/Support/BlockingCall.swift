// Runs a call that may block (a plugin's C code) on a thread of its own, and waits for it only so long.
internal import Foundation
internal import Synchronization

enum BlockingCall {
    /// Runs `work` on a new thread and waits for it at most `limit` (and not past the waiting
    /// task's cancellation). Returns whether it returned in time; if not, it runs on, unwaited
    /// for: a thread in native code cannot be stopped, only no longer waited for.
    ///
    /// A thread of its own, and a timer on Swift's clock, not Dispatch's global queue: on Linux
    /// that pool has about one thread per core and adds one a second when they block, so a few
    /// blocked calls held up the others' starts, their timeouts and the signal handling behind them.
    static func run(atMost limit: Duration, _ work: @escaping @Sendable () -> Void) async -> Bool {
        let outcome = Outcome()
        let timer = Task {
            try? await Task.sleep(for: limit)
            if !Task.isCancelled { outcome.resume(false) }
        }
        defer { timer.cancel() }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
                outcome.install(continuation)
                Thread {
                    work()
                    outcome.resume(true)
                }.start()
            }
        } onCancel: {
            outcome.resume(false)
        }
    }

    /// Runs `work` on a new thread and waits for it however long it takes, leaving Swift's
    /// cooperative pool (a thread per core) free for the tasks that must run meanwhile.
    static func run<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { continuation in
            Thread { continuation.resume(returning: work()) }.start()
        }
    }

    /// The one answer of a wait: the first of returned, timed out and cancelled.
    private final class Outcome: Sendable {
        private enum State {
            case waiting
            case installed(CheckedContinuation<Bool, Never>)
            /// Settled before the continuation was installed (cancelled at once).
            case settled(Bool)
            case done
        }
        private let state = Mutex(State.waiting)

        func install(_ continuation: CheckedContinuation<Bool, Never>) {
            let early: Bool? = state.withLock { state in
                if case .settled(let value) = state {
                    state = .done
                    return value
                }
                state = .installed(continuation)
                return nil
            }
            if let early { continuation.resume(returning: early) }
        }

        func resume(_ value: Bool) {
            let continuation: CheckedContinuation<Bool, Never>? = state.withLock { state in
                switch state {
                case .waiting:
                    state = .settled(value)
                    return nil
                case .installed(let continuation):
                    state = .done
                    return continuation
                case .settled, .done:
                    return nil
                }
            }
            continuation?.resume(returning: value)
        }
    }
}
