// HTTP face of the plugin host: the admin listing and dispatch of /v1/plugins/<name>/… to plugins.
internal import Foundation
internal import HTTPTypes
internal import Hummingbird
internal import Logging
internal import NIOCore

/// Registers the plugin routes on the gateway's router.
struct PluginRoutes {
    let registry: PluginRegistry
    let maxBodyBytes: Int

    static let dispatchMethods: [HTTPRequest.Method] = [.get, .post, .put, .patch, .delete, .head, .options]
    /// Hop-by-hop and framing headers are the server's business, not a plugin's.
    static let reservedResponseHeaders: Set<String> = ["content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"]

    func register(on router: Router<GatehouseRequestContext>) {
        router.get("/v1/plugins") { _, _ in
            let list = registry.statuses().map(Self.json)
            return try Response.json(object: ["object": "list", "data": list])
        }
        router.get("/v1/plugins/:name") { _, context in
            let name = try context.parameters.require("name")
            guard let status = registry.status(of: name) else {
                throw OpenAIError(.notFound, "no plugin named \(name)", code: "plugin_not_found")
            }
            var object = Self.json(status)
            object["metrics"] = registry.existingStats(for: name)?.summary() ?? NSNull()
            return try Response.json(object: object)
        }
        for method in Self.dispatchMethods {
            router.on("/v1/plugins/:name/**", method: method) { request, context in
                try await dispatch(request, context: context)
            }
        }
    }

    private func dispatch(_ request: Request, context: GatehouseRequestContext) async throws -> Response {
        let name = try context.parameters.require("name")
        let prefix = "/v1/plugins/\(name)"
        let path = request.uri.path.hasPrefix(prefix) ? String(request.uri.path.dropFirst(prefix.count)) : "/"
        let body = try await request.body.collect(upTo: maxBodyBytes)
        guard let instance = registry.acquire(name) else {
            let state = registry.status(of: name)?.state
            let reason = state.map { "plugin \(name) is \($0.rawValue)" } ?? "no plugin named \(name)"
            throw OpenAIError(.notFound, reason, code: "plugin_not_found")
        }
        if let limiter = instance.rateLimiter, let wait = limiter.check(client: context.clientID ?? RateLimiter.addressBucket(context.remoteAddress)) {
            instance.requestFinished()
            throw OpenAIError.rateLimited(
                wait: wait, code: "plugin_rate_limit_exceeded") { "plugin \(name) allows \(RateLimiter.format(limiter.rate ?? 0)) requests/s; retry after \($0) s" }
        }
        var headers: [(String, String)] = []
        headers.reserveCapacity(request.headers.count)
        for field in request.headers { headers.append((field.name.canonicalName, field.value)) }
        let call = PluginCall(
            method: request.method.rawValue, path: path.isEmpty ? "/" : path, query: request.uri.query ?? "",
            headers: headers, body: body, requestID: context.requestID)
        let stats = instance.stats
        let started = ContinuousClock.now
        stats.requestStarted()
        let reply = await instance.handle(call)
        do {
            let response: Response
            switch reply {
            case .whole(let status, let replyHeaders, let replyBody):
                let status = try Self.status(status, plugin: name)
                response = Response(
                    status: status, headers: Self.responseFields(replyHeaders, plugin: name, logger: context.logger),
                    body: PluginStatus.allowsBody(status.code) ? .init(byteBuffer: replyBody) : .init())
            case .stream(let status, let replyHeaders, let chunks):
                let status = try Self.status(status, plugin: name)
                // Without a body (204, 304), what the plugin writes is dropped (its writes then fail).
                response = Response(
                    status: status, headers: Self.responseFields(replyHeaders, plugin: name, logger: context.logger),
                    body: PluginStatus.allowsBody(status.code) ? .init(asyncSequence: chunks) : .init())
            case .timedOut where Task.isCancelled:
                // Not the plugin's fault: the shutdown's time ran out (the wait ends when cancelled).
                throw OpenAIError.serverShuttingDown
            case .timedOut:
                throw OpenAIError(
                    .gatewayTimeout, "plugin \(name) did not answer within \(UpstreamFailure.seconds(instance.timeout))", code: "plugin_timeout")
            }
            stats.requestFinished(status: response.status.code, duration: ContinuousClock.now - started)
            return response
        } catch let error as OpenAIError {
            stats.requestFinished(status: error.status.code, duration: ContinuousClock.now - started)
            throw error
        }
    }

    /// A plugin's status code, refused (500) unless it is a final HTTP status (200-599).
    static func status(_ code: UInt16, plugin: String) throws -> HTTPResponse.Status {
        guard PluginStatus.isFinal(code) else {
            let kind = (100...199).contains(code) ? "interim HTTP status \(code), which cannot end a request" : "invalid HTTP status \(code)"
            throw OpenAIError(.internalServerError, "plugin \(plugin) answered with \(kind)", code: "plugin_invalid_status")
        }
        return HTTPResponse.Status(code: Int(code))
    }

    /// A plugin's response header fields without the invalid and the reserved ones (framing is
    /// the server's: a plugin's `Content-Length` that disagreed with its body would desynchronise
    /// the connection), each dropped one logged. Middleware's answers go through it too.
    /// - Parameter plugin: who set the fields, for the log line (names, when several middleware
    ///   could have); worked out only when a field is dropped.
    static func responseFields(_ pairs: [(String, String)], plugin: @autoclosure () -> String, logger: Logger) -> HTTPFields {
        var fields = HTTPFields()
        for (name, value) in pairs {
            guard let fieldName = HTTPField.Name(name), !Self.reservedResponseHeaders.contains(fieldName.canonicalName) else {
                logger.warning("plugin sent an invalid or reserved response header; dropped", metadata: ["header": .string(name), "plugin": .string(plugin())])
                continue
            }
            fields.append(HTTPField(name: fieldName, value: value))
        }
        return fields
    }

    static func json(_ status: PluginRegistry.Status) -> [String: Any] {
        var object: [String: Any] = ["name": status.name, "state": status.state.rawValue]
        object["version"] = status.version ?? NSNull()
        object["error"] = status.error ?? NSNull()
        object["abi"] = status.abi ?? NSNull()
        object["sha256"] = status.sha256 ?? NSNull()
        object["loaded_at"] = status.loadedAt.map { ISO8601DateFormatter().string(from: $0) } ?? NSNull()
        object["description"] = status.description ?? NSNull()
        return object
    }

}
