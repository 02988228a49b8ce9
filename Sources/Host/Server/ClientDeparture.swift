// Notices a client that leaves while its request is being answered, so the LLM call made for it can be abandoned.
internal import HTTPTypes
internal import NIOCore
internal import Synchronization

/// Whether the client of one router connection has gone while a request of it was being
/// answered: it closed its side of the connection (a FIN, or a reset), as an SDK does when its
/// timeout fires or a user stops a generation. Such a client waits for no answer, so the LLM
/// work for it is abandoned rather than run to its end, holding one of the upstream's slots
/// (Ollama answers one request per slot, queueing the rest); the route answers 499, which a
/// client that only half-closed can still read. Go's net/http (LlamaGate's server) cancels a
/// request's context on a FIN the same way, and nginx (`proxy_ignore_client_abort off`, its
/// default) abandons its upstream request.
final class ClientDeparture: Sendable {
    /// Why the request's answer is abandoned.
    enum Reason: Sendable {
        /// The client closed its side: the 499.
        case clientLeft
        /// The server's shutdown ran out of `shutdown_timeout`: the client is still there and
        /// is told so (`OpenAIError.serverShuttingDown`).
        case serverStopping
    }

    private struct State {
        var departed: Reason?
        var nextToken = 0
        var handlers: [Int: @Sendable () -> Void] = [:]
    }

    private let state = Mutex(State())

    /// Whether the answer has been abandoned, and why (nil: it has not).
    var departure: Reason? { state.withLock { $0.departed } }

    /// Whether the answer has been abandoned (the client went, or the server is stopping).
    var hasDeparted: Bool { departure != nil }

    /// The error an abandoned answer ends with (nil while it is not abandoned).
    var abandonment: OpenAIError? {
        switch departure {
        case .clientLeft: .clientClosedRequest
        case .serverStopping: .serverShuttingDown
        case nil: nil
        }
    }

    /// The client has gone (or the server is stopping): runs every registered handler, once.
    func depart(_ reason: Reason = .clientLeft) {
        let handlers = state.withLock { state -> [@Sendable () -> Void] in
            guard state.departed == nil else { return [] }
            state.departed = reason
            defer { state.handlers = [:] }
            return Array(state.handlers.values)
        }
        for handler in handlers { handler() }
    }

    /// Runs `work` in a task of its own, cancelled when the client leaves before it ends (at once
    /// if it already has): the upstream call inside stops, and `work` throws.
    /// - Throws: `OpenAIError.clientClosedRequest` when the client left,
    ///   `OpenAIError.serverShuttingDown` when the server stopped it; otherwise what `work` throws.
    func untilClientLeaves<T: Sendable>(_ work: sending @escaping () async throws -> T) async throws -> T {
        let task = Task { try await work() }
        let token = state.withLock { state -> Int? in
            guard state.departed == nil else { return nil }
            state.nextToken += 1
            state.handlers[state.nextToken] = { task.cancel() }
            return state.nextToken
        }
        if token == nil { task.cancel() }
        defer { if let token { _ = state.withLock { $0.handlers.removeValue(forKey: token) } } }
        do {
            return try await withTaskCancellationHandler { try await task.value } onCancel: { task.cancel() }
        } catch {
            if let abandonment { throw abandonment }
            throw error
        }
    }

    /// The departure watch of the router connection `channel` (its `HTTP1SemanticsHandler`'s).
    /// Without one (another pipeline), a watch that departs only if the connection has already
    /// closed, so the request is otherwise served as it would have been without the watch.
    static func of(_ channel: any Channel) async -> ClientDeparture {
        let found = try? await channel.eventLoop.submit {
            try channel.pipeline.syncOperations.handler(type: HTTP1SemanticsHandler.self).departure
        }.get()
        if let found { return found }
        let departure = ClientDeparture()
        if !channel.isActive { departure.depart() }
        return departure
    }
}

extension OpenAIError {
    /// The request's client left before its answer (nginx's 499 "client closed request"): written
    /// to nobody, but logged and counted as such.
    static var clientClosedRequest: OpenAIError {
        OpenAIError(HTTPResponse.Status(code: 499, reasonPhrase: "Client Closed Request"), "the client closed the connection before the answer", code: "client_closed_request")
    }

    /// The gateway's shutdown stopped before this answer was done (`shutdown_timeout` ran out, or
    /// a second signal came). A 503, not the 499 of a client that left: this client is still
    /// there, and may retry elsewhere.
    static var serverShuttingDown: OpenAIError {
        OpenAIError(
            .serviceUnavailable,
            "the gateway is shutting down and stopped before this answer was done (its shutdown_timeout ran out, or a second signal came)",
            code: "server_shutting_down")
    }
}
