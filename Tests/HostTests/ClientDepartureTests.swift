// Unit tests for ClientDeparture: work abandoned when the client leaves, untouched otherwise.
import Testing

@testable import Host

@Suite struct ClientDepartureTests {
    @Test func workEndsNormallyWhileTheClientStays() async throws {
        let departure = ClientDeparture()
        #expect(try await departure.untilClientLeaves { 42 } == 42)
        // Its own errors pass as they are.
        await #expect(throws: OpenAIError.self) {
            try await departure.untilClientLeaves { () async throws -> Int in throw OpenAIError(.badGateway, "upstream failed") }
        }
        #expect(!departure.hasDeparted)
    }

    @Test func leavingCancelsTheWorkInProgressWith499() async throws {
        let departure = ClientDeparture()
        let started = AsyncStream<Void>.makeStream()
        async let outcome: Result<Int, any Error> = {
            do {
                return .success(
                    try await departure.untilClientLeaves {
                        started.continuation.yield()
                        try await Task.sleep(for: .seconds(30))  // an upstream call in progress
                        return 1
                    })
            } catch { return .failure(error) }
        }()
        var iterator = started.stream.makeAsyncIterator()
        await iterator.next()
        let before = ContinuousClock.now
        departure.depart()
        guard case .failure(let error as OpenAIError) = await outcome else { Issue.record("the work was not abandoned"); return }
        #expect(error.status.code == 499 && error.code == "client_closed_request")
        #expect(ContinuousClock.now - before < .seconds(10))
    }

    @Test func workStartedAfterTheClientLeftIsCancelledAtOnce() async {
        let departure = ClientDeparture()
        departure.depart()
        departure.depart()  // once is enough; again changes nothing
        await #expect(throws: OpenAIError.self) {
            try await departure.untilClientLeaves { () async throws -> Int in
                try await Task.sleep(for: .seconds(30))
                return 1
            }
        }
    }
}
