// A second SIGTERM or SIGINT during the graceful drain stops the gateway at once.
internal import Logging
internal import ServiceLifecycle
internal import UnixSignals

/// The first SIGTERM or SIGINT starts the graceful drain (the service group's); a second one,
/// during the drain (a second Ctrl-C, an impatient supervisor), stops without waiting for
/// in-flight requests, as users of servers expect. ServiceLifecycle cannot take one signal
/// for both (its configuration refuses the overlap), so this service counts them itself; it
/// is shut down last, after the HTTP drain, so it listens all through it.
struct StopOnSecondSignal: Service {
    let logger: Logger

    /// Thrown to cancel the service group.
    struct Stopped: Error, CustomStringConvertible {
        var description: String { "a second signal during the graceful shutdown: stopped without waiting" }
    }

    func run() async throws {
        var seen = 0
        for await signal in await UnixSignalsSequence(trapping: .sigterm, .sigint).cancelOnGracefulShutdown() {
            seen += 1
            if seen >= 2 {
                logger.warning("second signal: stopping now, without waiting for requests in flight", metadata: ["signal": .string("\(signal)")])
                throw Stopped()
            }
        }
    }
}

extension StopOnSecondSignal {
    /// Waits for `task` (the plugins' shutdown, after the HTTP drain: past the service group,
    /// and so past this service) unless a SIGTERM or SIGINT comes first, which cancels it; says
    /// whether it finished. A second signal then still stops at once, as it does during the drain.
    static func wait(for task: Task<Void, Never>) async -> Bool {
        await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                await withTaskCancellationHandler { await task.value } onCancel: { task.cancel() }
                return true
            }
            group.addTask {
                // Ends without a signal when cancelled (the task finished first).
                for await _ in await UnixSignalsSequence(trapping: .sigterm, .sigint) { return false }
                return true
            }
            let finished = await group.next() ?? true
            group.cancelAll()
            return finished
        }
    }
}
