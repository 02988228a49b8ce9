// Gatehouse configuration: built-in defaults < gatehouse.yaml < .env < environment < CLI flags.
public import Foundation
internal import Yams

/// The whole effective configuration of one Gatehouse process.
public struct GatehouseConfig: Sendable {
    /// Which kind of upstream server the gateway talks to.
    public enum Backend: String, Sendable, CaseIterable {
        /// Ollama's native API (`/api/chat` streaming NDJSON, `/api/tags`, `/api/embed`).
        case ollama
        /// Any OpenAI-compatible server (llama.cpp server, vLLM, OpenAI): SSE streaming.
        case openai
    }

    public struct TLS: Sendable {
        public var enabled = false
        public var certFile = ""
        public var keyFile = ""
    }

    public struct RateLimit: Sendable {
        /// Sustained requests per second per client: the configured API key's holders together,
        /// or each client address when no key is configured (0 disables all rate limiting).
        public var requestsPerSecond = 50.0
        /// Bucket size: how many requests may arrive at once. Defaults to the rate.
        public var burst: Double?
        /// Requests per second across all clients together; none when unset.
        public var globalRequestsPerSecond: Double?
    }

    public struct Upstream: Sendable {
        public var backend = Backend.ollama
        public var url = "http://127.0.0.1:11434"
        /// Sent upstream as `Authorization: Bearer` (to either backend: an Ollama may sit behind an
        /// authenticating proxy). The client's own key is never forwarded.
        public var apiKey: String?
        /// Seconds: the deadline of a non-streamed upstream call, and the longest silence allowed
        /// between the chunks of a stream (whose total length is capped at an hour).
        public var timeout = 300.0
        public var connectTimeout = 5.0
        /// Connections AsyncHTTPClient keeps open to the upstream at most (the Ollama backend,
        /// https upstreams, models, embeddings, plugins' calls). A request that finds them all
        /// busy waits up to `connectTimeout` for one, then gets 503 `upstream_busy`. 512 is
        /// Ollama's own default queue (`OLLAMA_MAX_QUEUE`), past which it answers 503 itself.
        public var maxConnections = 512

        /// The path the OpenAI API's routes hang under, after `url`'s own: `/v1` (OpenAI's own
        /// servers, vLLM, llama.cpp), or nothing when `url`'s path already names an API version,
        /// as Google's `…/v1beta/openai` does; OpenAI's SDKs take such a URL as the API's base.
        public var openAIAPIPath: String { GatehouseConfig.pathNamesAPIVersion(url) ? "" : "/v1" }
    }

    public struct Cache: Sendable {
        public var enabled = true
        public var ttl = 300.0
        public var maxEntries = 1000
        public var maxBytes = 64 * 1024 * 1024
    }

    /// Per-plugin settings from the `plugins:` section.
    public struct PluginSettings: Sendable, Equatable {
        public var enabled = true
        /// JSON object text overriding the manifest's `config` defaults.
        public var configJSON: Data?
        /// Requests per second per client on the plugin's routes (overrides the manifest).
        public var rateLimit: Double?
        /// Seconds the plugin may take to answer (overrides the manifest; default: upstream timeout).
        public var timeout: Double?
    }

    public var host = "127.0.0.1"
    public var port = 11435
    public var pluginsDirectory = "plugins.d"
    public var maxBodyBytes = 10 * 1024 * 1024
    public var shutdownTimeout = 30.0
    /// Seconds a client connection may sit with no request being answered and nothing read
    /// (between keep-alive requests, or a request's head or body trickling in) before it is
    /// closed; 0 keeps idle connections open. nginx's `keepalive_timeout` default.
    public var idleTimeout = 75.0
    /// Client connections open at once; past it, new ones wait in the listen backlog until others
    /// close. nil: what the open-files limit allows (`OpenFilesLimit.defaultClientConnections`);
    /// 0: no limit.
    public var maxConnections: Int?
    /// Reverse proxies (addresses or CIDR ranges) whose `X-Forwarded-For` names the client for
    /// rate limits and logs; none by default, when the header is ignored.
    public var trustedProxies: [String] = []
    /// Web origins (`https://app.example.com`, or `*`) whose pages may call the API from a
    /// browser (CORS); none by default, when browsers keep pages from reading the answers.
    public var corsOrigins: [String] = []
    public var tls = TLS()
    /// When set, clients must present it (`X-API-Key` or `Authorization: Bearer`).
    public var apiKey: String?
    public var rateLimit = RateLimit()
    public var upstream = Upstream()
    public var cache = Cache()
    public var logLevel = "info"
    public var logFile: String?
    public var plugins: [String: PluginSettings] = [:]
    /// Where the configuration was read from (for messages).
    public var sources: [String] = ["defaults"]
    /// `GATEHOUSE_PLUGIN_<NAME>_<KEY>` variables (from .env and the environment): the top layer
    /// of each plugin's config.
    public var pluginEnvironment: [String: String] = [:]

    public init() {}

    /// Settings for plugin `name` (plugins not mentioned are enabled with no overrides).
    public func settings(forPlugin name: String) -> PluginSettings {
        plugins[name] ?? PluginSettings()
    }
}

extension GatehouseConfig {
    /// Loads the layered configuration.
    /// - Parameters:
    ///   - file: YAML file; `nil` means `gatehouse.yaml` if it exists.
    ///   - dotEnvFile: `.env` file read if it exists.
    ///   - environment: the process environment (overrides `.env`).
    /// - Throws: `ConfigProblems` naming every bad key.
    public static func load(
        file: String?, dotEnvFile: String = ".env", environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws -> GatehouseConfig {
        var config = GatehouseConfig()
        var problems: [ConfigProblem] = []
        let path = file ?? "gatehouse.yaml"
        if FileManager.default.fileExists(atPath: path) {
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
                let problem = FileProblem.of(path) ?? "cannot be read as UTF-8 text"
                throw ConfigProblems(problems: [ConfigProblem(file: path, key: "", line: nil, message: problem)])
            }
            problems += config.apply(yaml: text, file: path)
            config.sources.append(path)
        } else if file != nil {
            throw ConfigProblems(problems: [ConfigProblem(file: path, key: "", line: nil, message: "no such file")])
        }
        var variables: [String: String] = [:]
        if FileManager.default.fileExists(atPath: dotEnvFile) {
            guard let text = try? String(contentsOfFile: dotEnvFile, encoding: .utf8) else {
                let problem = FileProblem.of(dotEnvFile) ?? "cannot be read as UTF-8 text"
                throw ConfigProblems(problems: [ConfigProblem(file: dotEnvFile, key: "", line: nil, message: problem)])
            }
            let (values, dotEnvProblems) = parseDotEnv(text, file: dotEnvFile, environment: environment)
            variables = values
            problems += dotEnvProblems
            config.sources.append(dotEnvFile)
        }
        // An empty variable is unset here as in every layer, so it does not hide the `.env` value
        // (compose's `API_KEY: ${API_KEY}`, with API_KEY unset on the host, passes an empty one:
        // taken as set, it turned the key in `.env` off, and authentication with it).
        // A plugin's variable set empty still gives its key the empty string, as in `.env`
        // (PLUGINS.md §5): there it is a value, not a gateway setting with a default to keep.
        let setInEnvironment = environment.filter {
            $0.key.hasPrefix(Self.pluginEnvironmentPrefix) || !$0.value.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty
        }
        let fromDotEnv = Set(variables.keys).subtracting(setInEnvironment.keys)
        variables.merge(setInEnvironment) { _, process in process }
        problems += config.apply(environment: variables) { fromDotEnv.contains($0) ? dotEnvFile : "environment" }
        config.pluginEnvironment = variables.filter { $0.key.hasPrefix(Self.pluginEnvironmentPrefix) }
        if !problems.isEmpty { throw ConfigProblems(problems: problems) }
        return config
    }

    /// Applies a gatehouse.yaml document; returns the problems found.
    mutating func apply(yaml text: String, file: String) -> [ConfigProblem] {
        let reader = YAMLReader(file: file)
        guard let root = reader.root(of: text) else { return reader.problems }
        reader.checkKeys(root, at: "", allowed: ["server", "auth", "rate_limit", "upstream", "cache", "logging", "plugins_dir", "plugins"])
        if let server = reader.mapping(root, "server", at: "") {
            reader.checkKeys(server, at: "server", allowed: ["host", "port", "max_body_bytes", "shutdown_timeout", "idle_timeout", "max_connections", "trusted_proxies", "cors_origins", "tls"])
            host = reader.string(server, "host", at: "server") ?? host
            port = reader.int(server, "port", at: "server", range: 0...65535) ?? port
            maxBodyBytes = reader.int(server, "max_body_bytes", at: "server", range: 1...Int(Int32.max)) ?? maxBodyBytes
            shutdownTimeout = reader.duration(server, "shutdown_timeout", at: "server") ?? shutdownTimeout
            idleTimeout = reader.duration(server, "idle_timeout", at: "server") ?? idleTimeout
            maxConnections = reader.int(server, "max_connections", at: "server", range: 0...Int(Int32.max)) ?? maxConnections
            trustedProxies = reader.ipRanges(server, "trusted_proxies", at: "server") ?? trustedProxies
            corsOrigins =
                reader.commaList(
                    server, "cors_origins", at: "server", of: "web origins",
                    each: "a web origin (scheme://host[:port], no path, like https://app.example.com) or *", isValid: CORSPolicy.isValidEntry)
                ?? corsOrigins
            if let tlsNode = reader.mapping(server, "tls", at: "server") {
                reader.checkKeys(tlsNode, at: "server.tls", allowed: ["enabled", "cert_file", "key_file"])
                tls.enabled = reader.bool(tlsNode, "enabled", at: "server.tls") ?? tls.enabled
                tls.certFile = reader.string(tlsNode, "cert_file", at: "server.tls") ?? tls.certFile
                tls.keyFile = reader.string(tlsNode, "key_file", at: "server.tls") ?? tls.keyFile
            }
        }
        if let auth = reader.mapping(root, "auth", at: "") {
            reader.checkKeys(auth, at: "auth", allowed: ["api_key"])
            apiKey = reader.string(auth, "api_key", at: "auth").flatMap { $0.isEmpty ? nil : $0 } ?? apiKey
        }
        if let limit = reader.mapping(root, "rate_limit", at: "") {
            reader.checkKeys(limit, at: "rate_limit", allowed: ["requests_per_second", "burst", "global_requests_per_second"])
            rateLimit.requestsPerSecond = reader.double(limit, "requests_per_second", at: "rate_limit", minimum: 0) ?? rateLimit.requestsPerSecond
            rateLimit.burst = reader.double(limit, "burst", at: "rate_limit", minimum: 1) ?? rateLimit.burst
            rateLimit.globalRequestsPerSecond =
                reader.double(limit, "global_requests_per_second", at: "rate_limit", minimum: 0) ?? rateLimit.globalRequestsPerSecond
        }
        if let upstreamNode = reader.mapping(root, "upstream", at: "") {
            reader.checkKeys(upstreamNode, at: "upstream", allowed: ["backend", "url", "api_key", "timeout", "connect_timeout", "max_connections"])
            if let name = reader.string(upstreamNode, "backend", at: "upstream") {
                if let backend = Backend(rawValue: name) {
                    upstream.backend = backend
                } else {
                    reader.problem("upstream.backend", upstreamNode["backend"], "must be one of ollama, openai (got \"\(name)\")")
                }
            }
            if let url = reader.string(upstreamNode, "url", at: "upstream") {
                if let problem = Self.upstreamURLProblem(url) {
                    reader.problem("upstream.url", upstreamNode["url"], problem)
                } else {
                    upstream.url = Self.upstreamBaseURL(url)
                }
            }
            upstream.apiKey = reader.string(upstreamNode, "api_key", at: "upstream") ?? upstream.apiKey
            upstream.timeout = reader.duration(upstreamNode, "timeout", at: "upstream", positive: true) ?? upstream.timeout
            upstream.connectTimeout = reader.duration(upstreamNode, "connect_timeout", at: "upstream", positive: true) ?? upstream.connectTimeout
            upstream.maxConnections = reader.int(upstreamNode, "max_connections", at: "upstream", range: 1...100_000) ?? upstream.maxConnections
        }
        if let cacheNode = reader.mapping(root, "cache", at: "") {
            reader.checkKeys(cacheNode, at: "cache", allowed: ["enabled", "ttl", "max_entries", "max_bytes"])
            cache.enabled = reader.bool(cacheNode, "enabled", at: "cache") ?? cache.enabled
            cache.ttl = reader.duration(cacheNode, "ttl", at: "cache") ?? cache.ttl
            cache.maxEntries = reader.int(cacheNode, "max_entries", at: "cache", range: 1...10_000_000) ?? cache.maxEntries
            cache.maxBytes = reader.int(cacheNode, "max_bytes", at: "cache", range: 1...Int(Int32.max)) ?? cache.maxBytes
        }
        if let logging = reader.mapping(root, "logging", at: "") {
            reader.checkKeys(logging, at: "logging", allowed: ["level", "file"])
            if let level = reader.string(logging, "level", at: "logging") {
                if Self.logLevels.contains(level) {
                    logLevel = level
                } else {
                    reader.problem("logging.level", logging["level"], "must be one of \(Self.logLevels.joined(separator: ", ")) (got \"\(level)\")")
                }
            }
            // Empty is none (standard output), as an empty key or certificate path is.
            if let file = reader.string(logging, "file", at: "logging") { logFile = file.isEmpty ? nil : file }
        }
        pluginsDirectory = reader.string(root, "plugins_dir", at: "") ?? pluginsDirectory
        if let pluginsNode = reader.mapping(root, "plugins", at: "") {
            for (key, value) in pluginsNode {
                guard let name = key.string else { continue }
                let path = "plugins.\(name)"
                guard let entry = value.mapping else {
                    reader.problem(path, value, "must be a mapping with any of 'enabled', 'config', 'rate_limit', 'timeout'")
                    continue
                }
                reader.checkKeys(entry, at: path, allowed: ["enabled", "config", "rate_limit", "timeout"])
                var settings = PluginSettings()
                settings.enabled = reader.bool(entry, "enabled", at: path) ?? true
                settings.rateLimit = reader.double(entry, "rate_limit", at: path, minimum: 0)
                settings.timeout = reader.duration(entry, "timeout", at: path, positive: true)
                if let configNode = reader.node(entry, "config") {
                    if configNode.mapping != nil {
                        settings.configJSON = try? JSONSerialization.data(withJSONObject: reader.jsonValue(configNode, at: "\(path).config"), options: [.sortedKeys])
                    } else {
                        reader.problem("\(path).config", configNode, "must be a mapping")
                    }
                }
                plugins[name] = settings
            }
        }
        return reader.problems
    }

    /// Prefix of the environment variables that override plugin config keys.
    public static let pluginEnvironmentPrefix = "GATEHOUSE_PLUGIN_"

    static let logLevels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]

    /// An upstream URL as the gateway uses it: no trailing slash, and no final `/v1`. The
    /// gateway adds `/v1/...` (`Upstream.openAIAPIPath`; Ollama's `/api/...`) itself, while
    /// OpenAI's SDKs and the docs of vLLM and llama.cpp spell base URLs with `/v1`; taken as
    /// written, such a URL sent every request to `/v1/v1/...` and got a 404 that read like an
    /// unknown model.
    static func upstreamBaseURL(_ url: String) -> String {
        guard var components = URLComponents(string: url) else { return url }
        var path = components.percentEncodedPath
        while path.hasSuffix("/") { path.removeLast() }
        if path.hasSuffix("/v1") { path.removeLast(3) }
        while path.hasSuffix("/") { path.removeLast() }
        components.percentEncodedPath = path
        return components.string ?? url
    }

    /// Whether a segment of `url`'s path is an API version: `v`, digits, then optionally a
    /// lowercase word and digits (`v1`, `v2`, `v1beta`, `v1alpha1`).
    static func pathNamesAPIVersion(_ url: String) -> Bool {
        guard let path = URLComponents(string: url)?.path else { return false }
        return path.split(separator: "/").contains { $0.wholeMatch(of: /v[0-9]+(?:[a-z][a-z0-9]*)?/) != nil }
    }

    /// Why `text` cannot be the upstream's URL, or nil when it can. The message never repeats
    /// a password the URL holds: it goes to stderr and the journal.
    static func upstreamURLProblem(_ text: String) -> String? {
        let shown = text.contains("@") ? "a value with an @, not repeated here" : "\"\(text)\""
        guard let components = URLComponents(string: text), let scheme = components.scheme?.lowercased(), scheme == "http" || scheme == "https",
            let host = components.host, !host.isEmpty
        else {
            return "must be an http:// or https:// URL with a host (got \(shown))"
        }
        if text.contains(where: \.isWhitespace) {
            return "must not contain spaces (got \(shown))"
        }
        if let port = components.port, !(1...65535).contains(port) {
            // Past 65535, NIO traps on the first connection (a crash at the first readiness probe)
            // and the pass-through's connection wraps it round to another port.
            return "has port \(port), which must be 1-65535 (got \(shown))"
        }
        if ["http", "https"].contains(host.lowercased()) {
            // `https//api.openai.com/v1`, read as host "https": a scheme missing its colon.
            return "names '\(host)' as its host: is a scheme missing its colon (\(host)://…)? (got \(shown))"
        }
        if components.user != nil || components.password != nil {
            // Not sent (neither client sends a URL's user info), and it would be shown in every
            // upstream error, /health/ready's included.
            return "must not hold credentials (user:password@): set the key in upstream.api_key (GATEHOUSE_UPSTREAM_API_KEY), sent as Bearer"
        }
        if components.query != nil || components.fragment != nil {
            // The routes (/api/chat, /v1/chat/completions) are appended to the URL, so a query
            // would end up inside the path; and it is shown in every upstream error and the
            // start-up line, where a key in it would be too. Not repeated here for that reason.
            return "must not have a query or fragment (?… or #…): the gateway appends its routes to the URL; a key goes in upstream.api_key (GATEHOUSE_UPSTREAM_API_KEY)"
        }
        return nil
    }
}
