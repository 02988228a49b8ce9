// Unit tests for the start-up signal watch's hand-over to the service group.
import Logging
import Testing
import UnixSignals

@testable import Host

@Suite struct StartupSignalWatchTests {
    private func watch(_ signals: AsyncStream<UnixSignal>) -> StartupSignalWatch {
        StartupSignalWatch(signals: signals, logger: Logger(label: "test"), patience: 60) {
            Issue.record("the watch tried to end the process")
        }
    }

    @Test func aSignalTheWatchHasNotTakenYetStillShutsTheGroupDown() async {
        // The signal reaches the watch's stream just before the hand-over, and its task takes it
        // later: the hand-over asked once, found no signal, and the signal was lost (the group
        // had not trapped it), so the gateway ran on.
        let (signals, sender) = AsyncStream<UnixSignal>.makeStream()
        let watch = watch(signals)
        sender.yield(.sigterm)
        await watch.waitAfterHandOver()  // returns: the signal came to the watch
        #expect(watch.stopRequested)
        watch.finish()
    }

    @Test func aSignalAfterTheHandOverEndsTheWait() async {
        let (signals, sender) = AsyncStream<UnixSignal>.makeStream()
        let watch = watch(signals)
        let waiting = Task { await watch.waitAfterHandOver() }
        sender.yield(.sigint)
        await waiting.value
        #expect(watch.stopRequested)
        // A second signal after the hand-over is the group's to count: the watch does not exit.
        sender.yield(.sigint)
        watch.finish()
    }

    @Test func withoutASignalTheWaitEndsWhenTheWatchIsFinished() async {
        let (signals, _) = AsyncStream<UnixSignal>.makeStream()
        let watch = watch(signals)
        let waiting = Task { await watch.waitAfterHandOver() }
        #expect(!watch.stopRequested)
        watch.finish()
        await waiting.value
        #expect(!watch.stopRequested)
        // And a wait that starts after the finish does not block.
        await watch.waitAfterHandOver()
    }

    @Test func cancellingTheWaitFinishesTheWatch() async {
        let (signals, _) = AsyncStream<UnixSignal>.makeStream()
        let watch = watch(signals)
        let waiting = Task { await watch.waitAfterHandOver() }
        waiting.cancel()
        await waiting.value
        #expect(!watch.stopRequested)
    }
}
