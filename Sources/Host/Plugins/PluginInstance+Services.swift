// ABI 1.1 host services for one plugin instance: LLM calls, middleware registration, custom metrics.
internal import Foundation
internal import Logging
internal import PluginABI

extension PluginInstance {
    /// Runs an LLM call for the plugin through the gateway's chat pipeline and reports back
    /// through the C callbacks. The call counts as in flight, so shutdown waits for `onDone`.
    func llmChat(
        requestJSON: Data, requestID: String, onChunk: gh_llm_chunk_fn?, onDone: @escaping gh_llm_done_fn, context: UnsafeMutableRawPointer?
    ) {
        requestStarted()
        let callbacks = UnsafeSendable((onChunk, onDone, context))
        Task {
            defer { requestFinished() }
            let (onChunk, onDone, context) = callbacks.value
            do {
                guard let chat = services.chat else {
                    throw OpenAIError(.serviceUnavailable, "the LLM service is not available in this process", code: "llm_unavailable")
                }
                guard let body = try? JSONSerialization.jsonObject(with: requestJSON) as? [String: Any] else {
                    throw OpenAIError(.badRequest, "request_json is not a JSON object", code: "invalid_json")
                }
                var request = try ChatRequest(body: body)
                let completion: ChatCompletion
                if let onChunk {
                    request.stream = true
                    completion = try await streamCompletion(request, chat: chat, requestID: requestID, onChunk: onChunk, context: context)
                } else {
                    request.stream = false
                    completion = try await chat.complete(request, requestID: requestID).completion
                }
                stats.llmCall(succeeded: true, promptTokens: completion.promptTokens, completionTokens: completion.completionTokens)
                completion.json.withUnsafeBytes { json in
                    onDone(context, GH_OK, 200, gh_bytes(data: json.baseAddress?.assumingMemoryBound(to: UInt8.self), len: json.count), gh_bytes(data: nil, len: 0))
                }
            } catch {
                stats.llmCall(succeeded: false, promptTokens: 0, completionTokens: 0)
                let failure = error as? OpenAIError ?? OpenAIError(.badGateway, String(describing: error))
                logger.warning(
                    "LLM call failed", metadata: ["request_id": .string(requestID), "status": .stringConvertible(failure.status.code), "error": .string(failure.message)])
                // The error as a client would get it (with its `code`, `type` and `param`), for a
                // plugin built against ABI 1.2 or later: 1.1 promised an empty `response_json`.
                let errorJSON = library.descriptor.pointee.abi_minor >= 2 ? failure.body(requestID: requestID) : Data()
                var message = failure.message
                message.withUTF8 { text in
                    errorJSON.withUnsafeBytes { json in
                        onDone(
                            context, GH_ERR_INTERNAL, UInt16(failure.status.code),
                            gh_bytes(data: json.baseAddress?.assumingMemoryBound(to: UInt8.self), len: json.count),
                            gh_bytes(data: text.baseAddress, len: text.count))
                    }
                }
            }
        }
    }

    /// Streams a completion to the plugin chunk by chunk and assembles the whole answer.
    private func streamCompletion(
        _ request: ChatRequest, chat: ChatService, requestID: String, onChunk: gh_llm_chunk_fn, context: UnsafeMutableRawPointer?
    ) async throws -> ChatCompletion {
        var text = ""
        var finishReason: Any = NSNull()
        var id = OpenAIShapes.completionID()
        var usage = (prompt: 0, completion: 0)
        for try await event in try await chat.stream(request, requestID: requestID) {
            switch event {
            case .usage(let prompt, let completion):
                usage = (prompt, completion)
            case .chunk(let data):
                let chunk = (try? JSONSerialization.jsonObject(with: data) as? [String: Any]) ?? [:]
                if let chunkID = chunk["id"] as? String { id = chunkID }
                let choice = (chunk["choices"] as? [[String: Any]])?.first
                var delta = (choice?["delta"] as? [String: Any])?["content"] as? String ?? ""
                if let reason = choice?["finish_reason"] as? String { finishReason = reason }
                text += delta
                data.withUnsafeBytes { json in
                    delta.withUTF8 { deltaBytes in
                        onChunk(
                            context, gh_bytes(data: json.baseAddress?.assumingMemoryBound(to: UInt8.self), len: json.count),
                            gh_bytes(data: deltaBytes.baseAddress, len: deltaBytes.count))
                    }
                }
            }
        }
        let json = OpenAIShapes.data([
            "id": id, "object": "chat.completion", "created": OpenAIShapes.now(), "model": request.model,
            "choices": [["index": 0, "message": ["role": "assistant", "content": text], "finish_reason": finishReason]],
            "usage": OpenAIShapes.usage(prompt: usage.prompt, completion: usage.completion),
        ])
        return ChatCompletion(json: json, promptTokens: usage.prompt, completionTokens: usage.completion)
    }

    /// Installs a middleware from a plugin's spec (copied).
    func registerMiddleware(_ spec: gh_middleware_spec) -> gh_status {
        let name = spec.name.map { String(cString: $0) } ?? "unnamed"
        let scope: RegisteredMiddleware.Scope
        switch spec.scope {
        case GH_SCOPE_ALL:
            scope = .all
        case GH_SCOPE_OWN_ROUTES:
            scope = .ownRoutes(prefix: "/v1/plugins/\(manifest.name)/")
        case GH_SCOPE_PREFIX:
            guard let prefix = spec.path_prefix.map({ String(cString: $0) }), prefix.hasPrefix("/") else {
                logger.error("middleware refused: GH_SCOPE_PREFIX needs a path_prefix starting with '/'", metadata: ["middleware": .string(name)])
                return GH_ERR_INVALID_ARGUMENT
            }
            scope = .prefix(prefix)
        default:
            logger.error("middleware refused: unknown scope \(spec.scope.rawValue)", metadata: ["middleware": .string(name)])
            return GH_ERR_INVALID_ARGUMENT
        }
        guard spec.on_request != nil || spec.on_response != nil else {
            logger.error("middleware refused: on_request and on_response are both NULL", metadata: ["middleware": .string(name)])
            return GH_ERR_INVALID_ARGUMENT
        }
        services.middleware.add(
            instance: self, name: name, priority: spec.priority, scope: scope, onRequest: spec.on_request, onResponse: spec.on_response,
            context: spec.context)
        logger.info("middleware registered", metadata: ["middleware": .string(name), "priority": .stringConvertible(spec.priority)])
        return GH_OK
    }
}
