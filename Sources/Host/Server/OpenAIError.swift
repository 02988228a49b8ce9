// Errors in OpenAI's JSON shape: {"error":{"message","type","code","param","request_id"}}.
internal import Foundation
internal import Logging
public import HTTPTypes
public import Hummingbird
internal import NIOCore
internal import NIOHTTP1

/// A client-visible error, rendered the way OpenAI's API renders errors.
public struct OpenAIError: HTTPResponseError, Sendable {
    public var status: HTTPResponse.Status
    public var message: String
    public var type: String
    public var code: String?
    /// The request field at fault, as OpenAI names it (`"messages"`, `"stop"`), when one is.
    public var param: String?
    /// Extra response headers (e.g. Retry-After).
    public var headers: HTTPFields = [:]

    public init(_ status: HTTPResponse.Status, _ message: String, type: String? = nil, code: String? = nil, param: String? = nil) {
        self.status = status
        self.message = message
        self.type = type ?? Self.defaultType(for: status)
        self.code = code
        self.param = param
    }

    /// This error with the response header `name` set to `value` (`Retry-After`, `Allow`, …).
    func with(_ name: HTTPField.Name, _ value: String) -> OpenAIError {
        var error = self
        error.headers[name] = value
        return error
    }

    /// A 429 with `Retry-After` rounded up to whole seconds (at least 1, at most a year).
    /// - Parameter message: builds the message from those seconds.
    static func rateLimited(wait: Double, code: String, message: (Int) -> String) -> OpenAIError {
        // A rate as small as 1e-20 per second waits longer than Int can count (a trap, not a
        // throw): no client waits a year anyway.
        let seconds = max(1, Int(min(wait, Self.longestRetryAfter).rounded(.up)))
        return OpenAIError(.tooManyRequests, message(seconds), code: code).with(.retryAfter, String(seconds))
    }

    /// The longest `Retry-After` given, in seconds: a year.
    static let longestRetryAfter = 365.0 * 86_400

    static func defaultType(for status: HTTPResponse.Status) -> String {
        switch status.code {
        case 400, 413, 422: "invalid_request_error"
        case 401: "authentication_error"
        case 403: "permission_error"
        case 404: "invalid_request_error"  // OpenAI's type for an unknown model or URL alike
        case 429: "rate_limit_error"
        case 500..<600: "api_error"
        default: "invalid_request_error"
        }
    }

    public func response(from request: Request, context: some RequestContext) throws -> Response {
        response(requestID: (context as? GatehouseRequestContext)?.requestID)
    }

    /// The JSON body of this error, its members in sorted order. Written directly: a flood of
    /// refused requests (429s) is when this runs most, and with JSONSerialization the
    /// pass-through answered such a flood 2.3 to 2.7 times slower (docs/PERFORMANCE.md).
    func body(requestID: String?) -> Data {
        var output: [UInt8] = []
        output.reserveCapacity(160 + message.utf8.count)
        output.append(contentsOf: #"{"error":{"#.utf8)
        var first = true
        // `code` and `param` are always there, null when unset, as in OpenAI's own errors
        // (typed clients decode them as required-but-nullable).
        func member(_ key: String, _ value: String?) {
            if !first { output.append(UInt8(ascii: ",")) }
            first = false
            JSONText.append(key, to: &output)
            output.append(UInt8(ascii: ":"))
            if let value { JSONText.append(value, to: &output) } else { output.append(contentsOf: "null".utf8) }
        }
        member("code", code)
        member("message", message)
        member("param", param)
        if let requestID, !requestID.isEmpty { member("request_id", requestID) }
        member("type", type)
        output.append(contentsOf: "}}".utf8)
        return Data(output)
    }

    func response(requestID: String?) -> Response {
        var fields = headers
        fields[.contentType] = "application/json"
        return Response(status: status, headers: fields, body: .init(byteBuffer: ByteBuffer(data: body(requestID: requestID))))
    }
}

extension OpenAIError {
    /// The 413 for a request body over `server.max_body_bytes` (router and pass-through alike).
    static var bodyTooLarge: OpenAIError {
        OpenAIError(.contentTooLarge, "request body is larger than the configured limit", code: "body_too_large")
    }

    /// The error that ends an upstream stream whose line (an NDJSON line, an SSE `data:` line)
    /// grew past `limit` bytes without ending: the gateway holds a line whole, so it stops there.
    static func upstreamLineTooLong(limit: Int) -> OpenAIError {
        OpenAIError(
            .badGateway, "upstream sent a stream line longer than \(limit / 1024 / 1024) MiB, the most the gateway holds for one line",
            code: "upstream_too_large")
    }

    /// The answer to a request that cannot be read, after which the connection closes (the
    /// next request cannot be found): 431 for a head over the size limit, else 400 naming what
    /// was wrong.
    static func malformedRequest(_ rejection: MalformedRequest) -> OpenAIError {
        switch rejection {
        case .parser(let error): malformedRequest(error)
        case .transferEncodingInHTTP10:
            OpenAIError(
                .badRequest, "malformed HTTP request: an HTTP/1.0 request cannot use Transfer-Encoding (send Content-Length, or use HTTP/1.1)",
                code: "malformed_http")
        case .hostMissingOrRepeated:
            OpenAIError(.badRequest, "malformed HTTP request: an HTTP/1.1 request needs exactly one Host header", code: "malformed_http")
        case .unsupportedTransferCoding:
            OpenAIError(
                .notImplemented, "unsupported Transfer-Encoding: the gateway takes only chunked (send the body uncompressed)",
                code: "unsupported_transfer_encoding")
        }
    }

    /// The answer to a request NIO's HTTP/1 parser rejected.
    static func malformedRequest(_ error: HTTPParserError) -> OpenAIError {
        let problem: String
        switch error {
        case .headerOverflow:
            return OpenAIError(
                .requestHeaderFieldsTooLarge, "request header fields are too large (the limit is \(GatehouseHTTP1Channel.maxHeaderBytes / 1024) KB)",
                code: "header_too_large")
        case .invalidMethod: problem = "invalid method"
        case .invalidURL: problem = "invalid request target"
        case .invalidVersion: problem = "invalid or unsupported HTTP version"
        case .invalidHeaderToken, .invalidCharactersUsed, .lfExpected, .invalidConstant: problem = "invalid characters in the request line or a header field"
        case .invalidContentLength, .unexpectedContentLength: problem = "invalid Content-Length (or both Content-Length and Transfer-Encoding)"
        case .invalidChunkSize: problem = "invalid chunk size in the chunked body"
        // Input that ended mid-request (the client closed, or the connection was closed idle):
        // rarely answerable, but logged.
        case .invalidEOFState: problem = "the connection ended before the request did"
        default: problem = "rejected by the HTTP/1.1 parser (conflicting or unsupported framing headers, or invalid syntax)"
        }
        return OpenAIError(.badRequest, "malformed HTTP request: \(problem)", code: "malformed_http")
    }
}

extension OpenAIError {
    /// Logs why a request failed on the gateway's or the upstream's side (a 5xx: an upstream
    /// unreachable, timed out, refusing the gateway's key, answering garbage), as a warning:
    /// the access line has only the status, and the client's error body is not in the log.
    /// Client errors (4xx) are the client's to read, and are not logged.
    func logIfServerSide(_ logger: Logger) {
        guard status.code >= 500 else { return }
        logger.warning(
            "request failed", metadata: ["status": .stringConvertible(status.code), "code": .string(code ?? type), "error": .string(message)])
    }

    /// The header fields of this error sent as a response after which the connection closes
    /// (a request the server cannot read past).
    func closingHeaderFields(requestID: String, bodyLength: Int) -> [(name: String, value: String)] {
        [("Content-Type", "application/json"), ("Content-Length", String(bodyLength)), ("X-Request-ID", requestID), ("Connection", "close")]
    }

    /// This error as a whole HTTP/1.1 response that closes the connection, as bytes, for the
    /// handlers that write below NIO's encoder.
    func closingResponseBytes(requestID: String) -> ByteBuffer {
        let body = ByteBuffer(data: body(requestID: requestID))
        var head = ResponseHead(version: .http1_1, status: status.code)
        for field in closingHeaderFields(requestID: requestID, bodyLength: body.readableBytes) { head.add(field.name, field.value) }
        return head.finish(appending: body)
    }
}

extension ByteBuffer {
    /// The end of a completion's event stream, as OpenAI ends one: the error event, if the
    /// stream failed, then `data: [DONE]`.
    mutating func writeEventStreamEnd(error: OpenAIError?, requestID: String) {
        if let error {
            writeStaticString("data: ")
            writeBytes(error.body(requestID: requestID))
            writeStaticString("\n\n")
        }
        writeStaticString("data: [DONE]\n\n")
    }
}
