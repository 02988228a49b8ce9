// Test plugin (Swift) exercising every host service: config, logging, LLM (whole and streamed),
// middleware that blocks /v1/chat/completions without X-Team, and custom metrics.
import PluginKit

struct ServicesTestPlugin: GatehousePlugin {
    static let name = "services-test"
    static let version = "1.0.0"

    let model: String
    let asks: PluginMetric
    let lastAnswerLength: PluginMetric

    init(context: PluginContext) throws {
        model = context.config.string("model") ?? "llama3.2:1b"
        asks = try context.counter("asks_total", help: "Questions the test plugin sent to the LLM.")
        lastAnswerLength = try context.gauge("last_answer_chars", help: "Length of the last answer.")
        let team = context.config.string("required_team") ?? "blue"
        try context.addMiddleware(name: "require-team", priority: 10, scope: .pathPrefix("/v1/chat/")) { call in
            guard call.header("x-team") == team else {
                call.respond(.error(status: 403, message: "send X-Team: \(team) to use chat completions", type: "permission_error"))
                return
            }
            call.setHeader("x-team-checked", "yes")
        }
        context.info("services-test ready", ["model": model])
    }

    func handle(_ request: PluginRequest, context: PluginContext) async throws -> PluginResponse {
        switch request.path {
        case "/config":
            var fields: [String] = []
            for key in ["a", "b", "c"] { fields.append("\"\(key)\":\"\(context.config.string(key) ?? "")\"") }
            fields.append("\"retries\":\(context.config.int("retries") ?? -1)")
            fields.append("\"verbose\":\(context.config.bool("verbose") ?? false)")
            return PluginResponse(status: 200, headers: [("content-type", "application/json")], body: Array("{\(fields.joined(separator: ","))}".utf8))
        case "/ask":
            context.info("asking", ["question_chars": String(request.body.count)])
            asks.increment()
            let reply = try await context.chat(model: model, messages: [.user(request.text)], options: ["temperature": .number(0)])
            lastAnswerLength.set(Double(reply.text.count))
            return PluginResponse(
                status: 200,
                headers: [("content-type", "text/plain"), ("x-tokens", "\(reply.promptTokens)+\(reply.completionTokens)")],
                body: Array(reply.text.utf8))
        case "/ask-stream":
            asks.increment()
            let pieces = context.chatStream(model: model, messages: [.user(request.text)])
            // Re-frame the LLM's pieces as our own chunked answer, one line per piece.
            let lines = AsyncThrowingStream<[UInt8], any Error> { continuation in
                Task {
                    do {
                        for try await piece in pieces { continuation.yield(Array("\(piece)|".utf8)) }
                        continuation.finish()
                    } catch {
                        continuation.finish(throwing: error)
                    }
                }
            }
            return PluginResponse(status: 200, headers: [("content-type", "text/plain")], stream: lines)
        case "/flood":
            // 64 MiB as fast as it can be made: the host holds back at most 16 MiB of it.
            let chunks = AsyncThrowingStream<[UInt8], any Error> { continuation in
                let chunk = [UInt8](repeating: UInt8(ascii: "z"), count: 64 * 1024)
                for _ in 0..<1024 { continuation.yield(chunk) }
                continuation.finish()
            }
            return PluginResponse(status: 200, headers: [("content-type", "application/octet-stream")], stream: chunks)
        case "/ask-missing-model":
            do {
                _ = try await context.chat(model: "missing", messages: [.user("hi")])
                return PluginResponse(status: 200, body: Array("unexpected success".utf8))
            } catch let error as LLMError {
                return .error(error)  // as the gateway would answer a client: code and type too
            }
        default:
            return .error(status: 404, message: "no route \(request.path)", type: "not_found")
        }
    }
}

@_cdecl("gatehouse_plugin_entry_v1")
public func gatehousePluginEntry() -> UnsafeRawPointer { exportPlugin(ServicesTestPlugin.self) }
