// Unit tests for waiting on a blocking call only so long (a plugin's shutdown).
import Foundation
import Testing

@testable import Host

@Suite struct BlockingCallTests {
    @Test func aCallThatReturnsInTimeIsWaitedFor() async {
        let ran = await BlockingCall.run(atMost: .seconds(5)) { usleep(10_000) }
        #expect(ran)
    }

    @Test func aCallThatBlocksIsWaitedForOnlyUntilTheLimit() async {
        let started = ContinuousClock.now
        let ran = await BlockingCall.run(atMost: .milliseconds(100)) { sleep(6) }
        #expect(!ran)
        #expect(ContinuousClock.now - started < .seconds(5))
    }

    @Test func cancellingTheWaiterStopsTheWait() async {
        let started = ContinuousClock.now
        let waiter = Task { await BlockingCall.run(atMost: .seconds(30)) { sleep(6) } }
        try? await Task.sleep(for: .milliseconds(50))
        waiter.cancel()
        #expect(await waiter.value == false)
        #expect(ContinuousClock.now - started < .seconds(5))
    }
}
