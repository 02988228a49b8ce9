// Cross-origin calls from web pages (CORS): the origins in `server.cors_origins` may call the API from a browser.
internal import Hummingbird
internal import HTTPTypes

/// Which web origins may call the gateway from a browser, and the headers that tell the browser
/// so. Shared by the router's `CORSMiddleware` and the chat pass-through. Credentials are
/// never allowed: clients authenticate with a header (`Authorization`, `X-API-Key`), not cookies.
struct CORSPolicy: Sendable {
    /// `*` was configured: any page may call, and the answer says `*` (no `Vary` needed).
    let allowsAnyOrigin: Bool
    /// The configured origins, lower-cased (scheme and host compare case-insensitively).
    let origins: Set<String>

    /// Response headers a page's script may read besides the CORS-safelisted ones.
    static let exposedHeaders = "X-Request-ID, X-Cache, Retry-After"
    /// How long a browser may reuse a preflight's answer (Chromium caps it at two hours).
    static let preflightMaxAge = "600"

    /// Nil when no origin is configured: CORS is off, and no request gets its headers.
    init?(origins: [String]) {
        guard !origins.isEmpty else { return nil }
        allowsAnyOrigin = origins.contains("*")
        self.origins = Set(origins.map { $0.lowercased() })
    }

    /// Whether `text` can be a `cors_origins` entry: `*`, or an origin as browsers send it,
    /// `scheme://host[:port]` with no path (a trailing slash would never match).
    static func isValidEntry(_ text: String) -> Bool {
        if text == "*" { return true }
        guard let separator = text.range(of: "://") else { return false }
        let scheme = text[..<separator.lowerBound]
        let authority = text[separator.upperBound...]
        return !scheme.isEmpty && scheme.allSatisfy { $0.isLetter || $0.isNumber || "+-.".contains($0) } && !authority.isEmpty
            && !authority.contains { "/?#@ ".contains($0) }
    }

    /// The `Access-Control-Allow-Origin` value for a request sent from `origin`; nil when the
    /// request is not cross-origin (no `Origin`) or its origin is not allowed.
    func allowedOrigin(_ origin: String?) -> String? {
        guard let origin else { return nil }
        if allowsAnyOrigin { return "*" }
        return origins.contains(origin.lowercased()) ? origin : nil
    }

    /// The CORS fields of an ordinary (not preflight) response to a request from `origin`.
    /// `Vary: Origin` goes on every answer when the value depends on the origin, so a shared
    /// cache never hands one origin's answer to another.
    func responseFields(origin: String?, add: (String, String) -> Void) {
        if !allowsAnyOrigin { add("Vary", "Origin") }
        guard let allowed = allowedOrigin(origin) else { return }
        add("Access-Control-Allow-Origin", allowed)
        add("Access-Control-Expose-Headers", Self.exposedHeaders)
    }

    /// The answer to a preflight: 204 with what the browser asked to use (the method and
    /// headers it named; the gateway's own checks still apply to the request that follows),
    /// or a 403 naming the origin that is not allowed.
    func preflight(origin: String, method: String, requestHeaders: String?, requestID: String) -> Response {
        guard allowedOrigin(origin) != nil else {
            return OpenAIError(
                .forbidden, "origin \(origin) may not call this API from a browser: it is not in server.cors_origins", code: "origin_not_allowed"
            ).response(requestID: requestID)
        }
        var headers: HTTPFields = [:]
        responseFields(origin: origin) { name, value in headers.append(HTTPField(name: HTTPField.Name(name)!, value: value)) }
        headers[.accessControlAllowMethods] = Self.isTokenList(method) ? method : "GET, POST"
        if let requestHeaders, Self.isTokenList(requestHeaders) { headers[.accessControlAllowHeaders] = requestHeaders }
        headers[.accessControlMaxAge] = Self.preflightMaxAge
        return Response(status: .noContent, headers: headers)
    }

    /// Header names or methods separated by commas (as browsers send them), safe to echo.
    static func isTokenList(_ text: String) -> Bool {
        !text.isEmpty && text.utf8.count <= 1024
            && text.utf8.allSatisfy { $0 == UInt8(ascii: ",") || $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") || (0x30...0x39).contains($0) || (0x41...0x5A).contains($0) || (0x61...0x7A).contains($0) }
    }
}

/// Answers CORS preflights and marks the router's answers for allowed origins. It sits just
/// inside the access log, so preflights (and the 403s refusing other origins) are logged and
/// counted like any request, and before authentication, since browsers send preflights without
/// the key. Errors thrown inside it are made into their responses here, as the access log would
/// make them, so every answer, errors included, carries the headers a page needs to read it.
struct CORSMiddleware: RouterMiddleware {
    typealias Context = GatehouseRequestContext
    let policy: CORSPolicy

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let origin = request.headers[.origin]
        if request.method == .options, let origin, let method = request.headers[.accessControlRequestMethod] {
            return policy.preflight(
                origin: origin, method: method, requestHeaders: request.headers[.accessControlRequestHeaders], requestID: context.requestID)
        }
        var response: Response
        do {
            response = try await next(request, context)
        } catch {
            response = AccessLogMiddleware.response(for: error, request: request, context: context)
        }
        policy.responseFields(origin: origin) { name, value in response.headers.append(HTTPField(name: HTTPField.Name(name)!, value: value)) }
        return response
    }
}
