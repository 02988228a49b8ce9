// Answers 405 with `Allow` for a path that has routes, but none for the request's method.
internal import HTTPTypes
internal import Hummingbird

/// The innermost middleware, added after every route, so it sees only the requests no route
/// took. When some route serves the path with other methods (`GET /v1/chat/completions`), the
/// answer is 405 naming them, with `Allow` (RFC 9110 §15.5.6), rather than "no route".
struct MethodNotAllowedMiddleware: RouterMiddleware {
    typealias Context = GatehouseRequestContext

    /// Each registered path pattern with the methods its routes answer.
    private let routes: [(path: RouterPath, methods: [HTTPRequest.Method])]

    /// - Parameter routes: the router's routes, read once every route is registered.
    init(routes: [Router<Context>.RouteDescription]) {
        var byPath: [(path: RouterPath, methods: [HTTPRequest.Method])] = []
        for route in routes {
            if let index = byPath.firstIndex(where: { $0.path == route.path }) {
                byPath[index].methods.append(route.method)
            } else {
                byPath.append((route.path, [route.method]))
            }
        }
        // The router answers HEAD wherever there is GET (autoGenerateHeadEndpoints).
        self.routes = byPath.map { entry in
            (entry.path, entry.methods.contains(.get) && !entry.methods.contains(.head) ? entry.methods + [.head] : entry.methods)
        }
    }

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let allowed = allowedMethods(for: request.uri.path)
        guard !allowed.isEmpty else { return try await next(request, context) }
        let list = allowed.map(\.rawValue).joined(separator: ", ")
        throw OpenAIError(
            .methodNotAllowed, "\(request.method.rawValue) is not allowed on \(request.uri.path); it takes \(list)", code: "method_not_allowed"
        ).with(.allow, list)
    }

    /// The methods of every route whose pattern matches `path`, in a stable order; empty when none does.
    func allowedMethods(for path: String) -> [HTTPRequest.Method] {
        let components = path.split(separator: "/", omittingEmptySubsequences: true)
        var methods = Set<HTTPRequest.Method>()
        for route in routes where Self.matches(route.path, components) { methods.formUnion(route.methods) }
        return methods.sorted { $0.rawValue < $1.rawValue }
    }

    /// Whether `pattern` matches the path `components`, as the router's trie does: literal and
    /// capture elements one component each, `**` the rest of the path.
    static func matches(_ pattern: RouterPath, _ components: [Substring]) -> Bool {
        var index = 0
        for element in pattern.components {
            if element == .recursiveWildcard { return index < components.count }
            guard index < components.count, element ~= components[index] else { return false }
            index += 1
        }
        return index == components.count
    }
}
