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
