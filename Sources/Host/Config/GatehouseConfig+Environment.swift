// Environment-variable and .env layers of the configuration (LlamaGate's names where they exist).
internal import Foundation

extension GatehouseConfig {
    /// Applies environment variables (already merged over `.env`); returns the problems found,
    /// each blamed on where its variable came from (`origin`: the `.env` file, or "environment").
    mutating func apply(environment: [String: String], origin: (String) -> String = { _ in "environment" }) -> [ConfigProblem] {
        var problems: [ConfigProblem] = []
        func bad(_ name: String, _ message: String) {
            problems.append(ConfigProblem(file: origin(name), key: name, line: nil, message: message))
        }
        func value(_ name: String) -> String? {
            guard let raw = environment[name] else { return nil }
            // Line breaks too: a secret mounted from a file (Kubernetes') often ends with one.
            let trimmed = raw.trimmingCharacters(in: .whitespacesAndNewlines)
            return trimmed.isEmpty ? nil : trimmed
        }
        func flag(_ name: String) -> Bool? {
            guard let text = value(name) else { return nil }
            switch text.lowercased() {
            case "1", "true", "yes", "on": return true
            case "0", "false", "no", "off": return false
            default:
                bad(name, "must be true or false (got \"\(text)\")")
                return nil
            }
        }
        func seconds(_ name: String) -> Double? {
            guard let text = value(name) else { return nil }
            guard let parsed = parseDuration(text) else {
                bad(name, "must be a duration like 30, 30s, 5m or 250ms, at most 365 days (got \"\(text)\")")
                return nil
            }
            return parsed
        }
        func list(_ name: String, of what: String, isValid: (String) -> Bool) -> [String]? {
            guard let text = value(name) else { return nil }
            let (items, invalid) = YAMLReader.commaSeparated(text, isValid: isValid)
            if let invalid {
                bad(name, "must be \(what) separated by commas ('\(invalid)' is neither)")
                return nil
            }
            return items
        }
        func integer(_ name: String, _ range: ClosedRange<Int>) -> Int? {
            guard let text = value(name) else { return nil }
            guard let number = Int(text), range.contains(number) else {
                bad(name, "must be an integer between \(range.lowerBound) and \(range.upperBound) (got \"\(text)\")")
                return nil
            }
            return number
        }

        // Gatehouse's own name wins: OLLAMA_HOST is often set for Ollama itself (to its listening address).
        if let (name, given) = value("GATEHOUSE_UPSTREAM_URL").map({ ("GATEHOUSE_UPSTREAM_URL", $0) }) ?? value("OLLAMA_HOST").map({ ("OLLAMA_HOST", $0) }) {
            // Quotes around it are not part of it (compose's list syntax keeps them); Ollama drops them too.
            let url = given.trimmingCharacters(in: CharacterSet(charactersIn: "\"'"))
            let withScheme = url.contains("://") ? url : Self.ollamaHostURL(url)
            if let problem = Self.upstreamURLProblem(withScheme) {
                bad(name, url.contains("://") ? problem : "must be a host:port or http(s) URL: \(problem)")
            } else {
                upstream.url = Self.upstreamBaseURL(withScheme)
            }
        }
        if let name = value("GATEHOUSE_BACKEND") {
            if let backend = Backend(rawValue: name.lowercased()) { upstream.backend = backend } else { bad("GATEHOUSE_BACKEND", "must be ollama or openai (got \"\(name)\")") }
        }
        if let key = value("GATEHOUSE_UPSTREAM_API_KEY") { upstream.apiKey = key }
        if let count = integer("GATEHOUSE_UPSTREAM_MAX_CONNECTIONS", 1...100_000) { upstream.maxConnections = count }
        if let key = value("API_KEY") { apiKey = key }
        if let text = value("RATE_LIMIT_RPS") {
            // Decimal only: Double() also reads hexadecimal ("0x10" as 16), as no one means it.
            if text.allSatisfy({ $0.isASCII && ($0.isNumber || "+-.eE".contains($0)) }), let rate = Double(text), rate.isFinite, rate >= 0 { rateLimit.requestsPerSecond = rate } else { bad("RATE_LIMIT_RPS", "must be a number >= 0 (got \"\(text)\")") }
        }
        if let port = integer("PORT", 0...65535) { self.port = port }
        if let host = value("GATEHOUSE_HOST") { self.host = host }
        if let timeout = seconds("TIMEOUT") {
            if timeout > 0 { upstream.timeout = timeout } else { bad("TIMEOUT", mustBePositiveDuration) }
        }
        if let enabled = flag("TLS_ENABLED") { tls.enabled = enabled }
        if let file = value("TLS_CERT_FILE") { tls.certFile = file }
        if let file = value("TLS_KEY_FILE") { tls.keyFile = file }
        if let timeout = seconds("SHUTDOWN_TIMEOUT") { shutdownTimeout = timeout }
        if let timeout = seconds("GATEHOUSE_IDLE_TIMEOUT") { idleTimeout = timeout }
        if let connections = integer("GATEHOUSE_MAX_CONNECTIONS", 0...Int(Int32.max)) { maxConnections = connections }
        trustedProxies = list("GATEHOUSE_TRUSTED_PROXIES", of: "IP addresses or CIDR ranges", isValid: { IPRange($0) != nil }) ?? trustedProxies
        corsOrigins = list("GATEHOUSE_CORS_ORIGINS", of: "web origins (scheme://host[:port], no path) or *", isValid: CORSPolicy.isValidEntry) ?? corsOrigins
        if let file = value("LOG_FILE") { logFile = file }
        if let debug = flag("DEBUG"), debug { logLevel = "debug" }
        if let directory = value("GATEHOUSE_PLUGINS_DIR") { pluginsDirectory = directory }
        if let bytes = integer("GATEHOUSE_MAX_BODY_BYTES", 1...Int(Int32.max)) { maxBodyBytes = bytes }
        if let enabled = flag("GATEHOUSE_CACHE_ENABLED") { cache.enabled = enabled }
        return problems
    }

    /// Checks combinations that no single key can: called after every layer is applied.
    public func validate() throws {
        var problems: [ConfigProblem] = []
        // A key no header can carry: every client would be refused, or every upstream call fail
        // with the HTTP client's error, which quotes the header (and so the key) to the client.
        for (key, secret) in [("auth.api_key (API_KEY)", apiKey), ("upstream.api_key (GATEHOUSE_UPSTREAM_API_KEY)", upstream.apiKey)] {
            if let secret, secret.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) {
                problems.append(ConfigProblem(file: "config", key: key, line: nil, message: "holds a control character, such as a line break, which no HTTP header can carry"))
            } else if let secret, secret.first == " " || secret.last == " " {
                // HTTP strips a header value's surrounding spaces (RFC 9110 §5.5): nobody could send it.
                problems.append(ConfigProblem(file: "config", key: key, line: nil, message: "begins or ends with a space, which HTTP strips from header values"))
            }
        }
        if tls.enabled {
            for (key, path) in [("server.tls.cert_file (TLS_CERT_FILE)", tls.certFile), ("server.tls.key_file (TLS_KEY_FILE)", tls.keyFile)] {
                if path.isEmpty {
                    problems.append(ConfigProblem(file: "config", key: key, line: nil, message: "is required when TLS is enabled"))
                } else if let problem = FileProblem.of(path) {
                    problems.append(ConfigProblem(file: "config", key: key, line: nil, message: "cannot read \(path): \(problem)"))
                }
            }
        }
        if !problems.isEmpty { throw ConfigProblems(problems: problems) }
    }

    /// An `OLLAMA_HOST` value without a scheme read as Ollama reads it: `http`, and port 11434
    /// when none is given ("10.0.0.5" is "http://10.0.0.5:11434", not port 80); a bare IPv6
    /// address ("::1") is one host, and no host (":11434") is this machine.
    static func ollamaHostURL(_ hostAndPort: String) -> String {
        var hostAndPort = hostAndPort
        let hostPart = hostAndPort.prefix { $0 != "/" }
        if hostPart.filter({ $0 == ":" }).count >= 2, !hostPart.hasPrefix("[") {
            hostAndPort = "[\(hostPart)]" + hostAndPort.dropFirst(hostPart.count)
        } else if hostPart.hasPrefix(":") {
            hostAndPort = "127.0.0.1" + hostAndPort
        }
        let url = "http://\(hostAndPort)"
        guard var components = URLComponents(string: url), components.port == nil, components.host != nil else { return url }
        components.port = 11434
        return components.string ?? url
    }
}

/// Parses a `.env` file as the dotenv convention reads one: `KEY=value` lines (LF or CRLF, a
/// leading byte-order mark ignored), `#` comments, an optional `export`, values optionally in
/// single quotes (literal) or double quotes (`\n`, `\t`, `\r`, `\"` and `\\` escapes), either
/// of which may span lines (a PEM key, say), an unquoted value ending at ` #`. `${NAME}` in an
/// unquoted or double-quoted value is replaced, as python-dotenv does, by an earlier key of the
/// file or else the process environment (`${NAME:-default}` gives a default; `\$` is a `$`).
/// A line it cannot read is a problem naming the file and line, never a value silently taken wrong.
func parseDotEnv(_ text: String, file: String, environment: [String: String] = [:]) -> ([String: String], [ConfigProblem]) {
    var values: [String: String] = [:]
    var problems: [ConfigProblem] = []
    let text = text.hasPrefix("\u{FEFF}") ? String(text.dropFirst()) : text
    // By Character, "\r\n" is one newline; splitting on "\n" alone would leave a CRLF file one line.
    let lines = text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline)
    var index = 0
    while index < lines.count {
        let lineNumber = index + 1
        func problem(_ message: String, key: String = "") { problems.append(ConfigProblem(file: file, key: key, line: lineNumber, message: message)) }
        var line = Substring(lines[index].trimmingCharacters(in: .whitespaces))
        index += 1
        if line.isEmpty || line.hasPrefix("#") { continue }
        if line.hasPrefix("export ") || line.hasPrefix("export\t") { line = line.dropFirst(7).drop(while: { $0 == " " || $0 == "\t" }) }
        guard let equals = line.firstIndex(of: "=") else {
            problem("expected KEY=value")
            continue
        }
        let key = line[..<equals].trimmingCharacters(in: .whitespaces)
        // Other tools' keys may share the file (dots and dashes included); only a name that
        // cannot be one (empty, or with spaces or quotes: a typo) is a problem.
        guard isVariableName(key) else {
            // Only the name's first word is quoted: the rest may be a secret (`API_KEY: c2VjcmV0==`
            // reads as a name up to its padding's `=`).
            let firstWord = key.prefix { !" \t:'\"".contains($0) }
            if key.isEmpty {
                problem("the name before '=' is empty")
            } else if key.contains(":") {
                problem("'\(firstWord)' is followed by a colon: .env lines are KEY=value, not YAML's KEY: value")
            } else {
                problem("the name before '=' holds spaces or quotes after '\(firstWord)'")
            }
            continue
        }
        var raw = String(line[line.index(after: equals)...].drop(while: { $0 == " " || $0 == "\t" }))
        let lookup = { (name: String) in values[name] ?? environment[name] }
        var result = dotEnvValue(Substring(raw), lookup: lookup)
        // A quoted value not closed on its line goes on over the next lines, as dotenv reads it.
        let firstLine = index
        while case .failure(let reason) = result, reason.unterminated, index < lines.count {
            raw += "\n" + lines[index]
            index += 1
            result = dotEnvValue(Substring(raw), lookup: lookup)
        }
        switch result {
        case .success(let value):
            values[key] = value
        case .failure(let reason):
            if reason.unterminated { index = firstLine }  // the lines after it are read as lines again
            problem(reason.message, key: key)
        }
    }
    return (values, problems)
}

/// Why a `.env` value could not be read.
struct DotEnvValueProblem: Error {
    let message: String
    /// The value's quote is not closed in the text given: more lines may close it.
    var unterminated = false
}

/// A `.env` value, from after the `=` and its spaces (over several lines for a quoted value),
/// with `${NAME}` references outside single quotes replaced by `lookup`'s value.
private func dotEnvValue(_ raw: Substring, lookup: (String) -> String?) -> Result<String, DotEnvValueProblem> {
    guard let quote = raw.first, quote == "\"" || quote == "'" else {
        // Unquoted: up to a comment (a `#` after a space), without the spaces around it.
        var text = raw
        if let hash = raw.indices.first(where: { raw[$0] == "#" && $0 > raw.startIndex && [" ", "\t"].contains(raw[raw.index(before: $0)]) }) {
            text = raw[..<hash]
        }
        text = Substring(text.trimmingCharacters(in: .whitespaces))
        var value = ""
        var index = text.startIndex
        while index < text.endIndex {
            if text[index] == "\\", text[text.index(after: index)...].first == "$" {
                value.append("$")  // `\$`: a dollar, not a reference
                index = text.index(index, offsetBy: 2)
            } else if let (replacement, end) = reference(in: text, at: index, lookup: lookup) {
                value += replacement
                index = end
            } else {
                value.append(text[index])
                index = text.index(after: index)
            }
        }
        return .success(value)
    }
    var value = ""
    var index = raw.index(after: raw.startIndex)
    while index < raw.endIndex, raw[index] != quote {
        if quote == "\"", raw[index] == "\\", raw.index(after: index) < raw.endIndex {
            index = raw.index(after: index)
            switch raw[index] {
            case "n": value.append("\n")
            case "t": value.append("\t")
            case "r": value.append("\r")
            case "\"", "\\", "$": value.append(raw[index])
            default: value.append("\\"); value.append(raw[index])
            }
        } else if quote == "\"", let (replacement, end) = reference(in: raw, at: index, lookup: lookup) {
            value += replacement
            index = raw.index(before: end)
        } else {
            value.append(raw[index])
        }
        index = raw.index(after: index)
    }
    guard index < raw.endIndex else {
        return .failure(DotEnvValueProblem(message: "the value's opening \(quote) is never closed", unterminated: true))
    }
    let rest = raw[raw.index(after: index)...].trimmingCharacters(in: .whitespaces)
    guard rest.isEmpty || rest.hasPrefix("#") else {
        // Not quoted back: the value may be a secret, and its tail would be in the message.
        return .failure(DotEnvValueProblem(message: "unexpected text after the quoted value's closing quote (only a # comment may follow it)"))
    }
    return .success(value)
}

/// The `${NAME}` (or `${NAME:-default}`) reference starting at `index` of `text`, if one does:
/// `lookup(NAME)`, else the default, else nothing; and the index after its `}`. A reference
/// does not run past a double quote.
private func reference(in text: Substring, at index: Substring.Index, lookup: (String) -> String?) -> (String, Substring.Index)? {
    guard text[index...].hasPrefix("${"), let close = text[index...].firstIndex(where: { $0 == "}" || $0 == "\"" }), text[close] == "}" else {
        return nil
    }
    let inside = text[text.index(index, offsetBy: 2)..<close]
    let (name, fallback) = inside.range(of: ":-").map { (String(inside[..<$0.lowerBound]), String(inside[$0.upperBound...])) } ?? (String(inside), "")
    return (lookup(name).flatMap { $0.isEmpty ? nil : $0 } ?? fallback, text.index(after: close))
}

/// Whether `name` can name a `.env` variable: not empty, no spaces or quotes.
private func isVariableName(_ name: String) -> Bool {
    !name.isEmpty && !name.contains(where: { $0.isWhitespace || $0 == "\"" || $0 == "'" })
}
