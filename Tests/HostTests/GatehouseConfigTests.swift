// Unit tests for configuration layering, durations, .env parsing and log redaction.
import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import Host

@Suite struct GatehouseConfigTests {
    @Test func yamlOverridesDefaults() {
        var config = GatehouseConfig()
        let problems = config.apply(
            yaml: """
                server: {host: 0.0.0.0, port: 8080, shutdown_timeout: 5s}
                upstream: {backend: openai, url: "http://127.0.0.1:8000", timeout: 2m}
                rate_limit: {requests_per_second: 10}
                plugins:
                  echo: {enabled: false}
                  alexa: {config: {wake_word: gatehouse}}
                """, file: "g.yaml")
        #expect(problems.isEmpty)
        #expect(config.host == "0.0.0.0")
        #expect(config.port == 8080)
        #expect(config.shutdownTimeout == 5)
        #expect(config.upstream.backend == .openai)
        #expect(config.upstream.timeout == 120)
        #expect(config.rateLimit.requestsPerSecond == 10)
        #expect(config.settings(forPlugin: "echo").enabled == false)
        #expect(config.settings(forPlugin: "alexa").enabled == true)
        #expect(config.settings(forPlugin: "unmentioned").enabled == true)
        #expect(String(decoding: config.settings(forPlugin: "alexa").configJSON ?? Data(), as: UTF8.self) == #"{"wake_word":"gatehouse"}"#)
    }

    @Test func invalidYAMLValuesNameTheirKeys() {
        var config = GatehouseConfig()
        let problems = config.apply(yaml: "server: {port: 99999}\nupstream: {backend: mystery}\nbogus: 1\n", file: "g.yaml").map(\.description)
        #expect(problems.contains { $0.contains("key 'server.port': must be between 0 and 65535") })
        #expect(problems.contains { $0.contains("key 'upstream.backend': must be one of ollama, openai") })
        #expect(problems.contains { $0.contains("key 'bogus': unknown key") })
    }

    @Test func environmentOverridesYAMLWithLlamaGateNames() {
        var config = GatehouseConfig()
        _ = config.apply(yaml: "server: {port: 8080}\n", file: "g.yaml")
        let problems = config.apply(environment: [
            "PORT": "9090", "OLLAMA_HOST": "10.1.2.3:11434", "API_KEY": "secret", "RATE_LIMIT_RPS": "7.5",
            "TIMEOUT": "90s", "DEBUG": "true", "SHUTDOWN_TIMEOUT": "3",
        ])
        #expect(problems.isEmpty)
        #expect(config.port == 9090)
        #expect(config.upstream.url == "http://10.1.2.3:11434")
        #expect(config.apiKey == "secret")
        #expect(config.rateLimit.requestsPerSecond == 7.5)
        #expect(config.upstream.timeout == 90)
        #expect(config.logLevel == "debug")
        #expect(config.shutdownTimeout == 3)
    }

    @Test func theExampleConfigIsValidAndHoldsTheDefaults() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let text = try String(contentsOf: root.appendingPathComponent("gatehouse.example.yaml"), encoding: .utf8)
        var config = GatehouseConfig()
        #expect(config.apply(yaml: text, file: "gatehouse.example.yaml").map(\.description) == [])
        let defaults = GatehouseConfig()
        #expect(config.port == defaults.port && config.idleTimeout == defaults.idleTimeout && config.trustedProxies == defaults.trustedProxies)
        #expect(config.corsOrigins == defaults.corsOrigins)
        #expect(config.shutdownTimeout == defaults.shutdownTimeout && config.maxBodyBytes == defaults.maxBodyBytes)
        // The issue's default: 50 requests/s per client, no global limit unless set.
        #expect(defaults.rateLimit.requestsPerSecond == 50 && defaults.rateLimit.globalRequestsPerSecond == nil)
        #expect(config.rateLimit.requestsPerSecond == defaults.rateLimit.requestsPerSecond)
        #expect(config.rateLimit.globalRequestsPerSecond == defaults.rateLimit.globalRequestsPerSecond)
    }

    @Test func idleTimeoutDefaultsToNginxsAndZeroTurnsItOff() {
        var config = GatehouseConfig()
        #expect(config.idleTimeout == 75)
        #expect(config.apply(yaml: "server: {idle_timeout: 2m}\n", file: "g.yaml").isEmpty)
        #expect(config.idleTimeout == 120)
        #expect(config.apply(environment: ["GATEHOUSE_IDLE_TIMEOUT": "0"]).isEmpty)
        #expect(config.idleTimeout == 0)
        let problems = config.apply(yaml: "server: {idle_timeout: forever}\n", file: "g.yaml").map(\.description)
        #expect(problems.contains { $0.contains("key 'server.idle_timeout': must be a duration") })
    }

    @Test func aPluginConfigNumberJSONCannotHoldStopsStartUpNamingTheKey() {
        // It used to drop the operator's whole config for the plugin, silently.
        var config = GatehouseConfig()
        let problems = config.apply(yaml: "plugins: {probe: {config: {b: hi, limit: .inf}}}\n", file: "g.yaml").map(\.description)
        #expect(problems.count == 1)
        #expect(problems.first?.contains("key 'plugins.probe.config.limit': must be a finite number") == true)
        var fine = GatehouseConfig()
        #expect(fine.apply(yaml: "plugins: {probe: {config: {b: hi, limit: 1.5}}}\n", file: "g.yaml").isEmpty)
        #expect(fine.plugins["probe"]?.configJSON.map { String(decoding: $0, as: UTF8.self) } == #"{"b":"hi","limit":1.5}"#)
    }

    @Test func clientConnectionLimitIsUnsetByDefaultAndZeroMeansNone() {
        var config = GatehouseConfig()
        #expect(config.maxConnections == nil)  // derived from the open-files limit at start-up
        #expect(config.apply(yaml: "server: {max_connections: 2000}\n", file: "g.yaml").isEmpty)
        #expect(config.maxConnections == 2000)
        #expect(config.apply(environment: ["GATEHOUSE_MAX_CONNECTIONS": "0"]).isEmpty)
        #expect(config.maxConnections == 0)
        let problems = config.apply(yaml: "server: {max_connections: -1}\n", file: "g.yaml").map(\.description)
        #expect(problems.contains { $0.contains("key 'server.max_connections': must be between 0 and") })
    }

    @Test func defaultClientConnectionsLeaveAReserveAndHalveTheRest() {
        // 20000 descriptors, 30 open: 64 kept back, half the rest for clients.
        #expect(OpenFilesLimit.defaultClientConnections(limit: 20000, openNow: 30) == (20000 - 30 - 64) / 2)
        // A small limit keeps back an eighth, at least 16.
        #expect(OpenFilesLimit.defaultClientConnections(limit: 256, openNow: 20) == (256 - 20 - 32) / 2)
        #expect(OpenFilesLimit.defaultClientConnections(limit: 64, openNow: 20) == (64 - 20 - 16) / 2)
        // Never below one connection.
        #expect(OpenFilesLimit.defaultClientConnections(limit: 32, openNow: 30) == 1)
        #expect(OpenFilesLimit.openDescriptors().map { $0 >= 3 } == true)  // stdin, stdout, stderr at least
    }

    @Test func upstreamConnectionLimitFromYAMLAndEnvironment() {
        var config = GatehouseConfig()
        #expect(config.upstream.maxConnections == 512)
        #expect(config.apply(yaml: "upstream: {max_connections: 64}\n", file: "g.yaml").isEmpty)
        #expect(config.upstream.maxConnections == 64)
        #expect(config.apply(environment: ["GATEHOUSE_UPSTREAM_MAX_CONNECTIONS": "2000"]).isEmpty)
        #expect(config.upstream.maxConnections == 2000)
        let yaml = config.apply(yaml: "upstream: {max_connections: 0}\n", file: "g.yaml").map(\.description)
        #expect(yaml.contains { $0.contains("key 'upstream.max_connections': must be between 1 and 100000") }, "\(yaml)")
        let environment = config.apply(environment: ["GATEHOUSE_UPSTREAM_MAX_CONNECTIONS": "lots"]).map(\.description)
        #expect(environment == ["environment: key 'GATEHOUSE_UPSTREAM_MAX_CONNECTIONS': must be an integer between 1 and 100000 (got \"lots\")"])
    }

    @Test func invalidEnvironmentValuesNameTheVariable() {
        var config = GatehouseConfig()
        let problems = config.apply(environment: ["PORT": "eighty", "TLS_ENABLED": "perhaps", "TIMEOUT": "soon"]).map(\.description)
        #expect(problems.contains("environment: key 'PORT': must be an integer between 0 and 65535 (got \"eighty\")"))
        #expect(problems.contains { $0.hasPrefix("environment: key 'TLS_ENABLED': must be true or false") })
        #expect(problems.contains { $0.hasPrefix("environment: key 'TIMEOUT': must be a duration") })
    }

    @Test func secretsStayOutOfStartUpErrors() throws {
        // Yams's own description quotes the offending line (a tab-indented key), or the whole
        // mapping for a duplicated key.
        var config = GatehouseConfig()
        let tabbed = config.apply(yaml: "auth:\n\tapi_key: TOPSECRET\n", file: "g.yaml").map(\.description)
        #expect(tabbed.count == 1 && tabbed[0].hasPrefix("g.yaml:2: not valid YAML: found character that cannot start any token at column 1"))
        #expect(!tabbed.joined().contains("TOPSECRET"))
        let twice = config.apply(yaml: "server: {port: 1}\nauth: {api_key: SECRETKEY}\nserver: {port: 2}\n", file: "g.yaml").map(\.description)
        #expect(twice == ["g.yaml:1: not valid YAML: the mapping holds 'server' more than once"])
        // A .env value with text after its closing quote: the tail was quoted back.
        let (_, dotEnv) = parseDotEnv("API_KEY=\"TOPSECRET\"xyz-rest-of-key\n", file: ".env")
        #expect(dotEnv.count == 1 && !dotEnv[0].description.contains("xyz"))
        // URL credentials: not sent upstream, and shown in every upstream error.
        for (variable, url) in [("OLLAMA_HOST", "http://admin:hunter2pw@10.0.0.5:11434"), ("GATEHOUSE_UPSTREAM_URL", "ftp://u:hunter2pw@h")] {
            var withCredentials = GatehouseConfig()
            let problems = withCredentials.apply(environment: [variable: url]).map(\.description)
            #expect(problems.count == 1 && problems[0].hasPrefix("environment: key '\(variable)': must"))
            #expect(!problems[0].contains("hunter2pw"))
        }
        #expect(config.apply(yaml: "upstream: {url: 'http://u:p@h'}\n", file: "g.yaml").map(\.message) == [
            "must not hold credentials (user:password@): set the key in upstream.api_key (GATEHOUSE_UPSTREAM_API_KEY), sent as Bearer"
        ])
        // A query: the routes would be appended after it, and a key in it shown everywhere.
        for url in ["http://h:8000/?key=hunter2pw", "http://h/v1#hunter2pw"] {
            var withQuery = GatehouseConfig()
            let problems = withQuery.apply(yaml: "upstream: {url: '\(url)'}\n", file: "g.yaml").map(\.description)
            #expect(problems.count == 1 && problems[0].contains("must not have a query or fragment") && !problems[0].contains("hunter2pw"), "\(problems)")
        }
        // A key with a line break in it (a YAML block scalar, a .env "\n") cannot be a header.
        var broken = GatehouseConfig()
        _ = broken.apply(yaml: "auth:\n  api_key: |\n    sk-client\nupstream:\n  api_key: \"sk-up\\r\"\n", file: "g.yaml")
        let error = #expect(throws: ConfigProblems.self) { try broken.validate() }
        #expect(error?.problems.map(\.key) == ["auth.api_key (API_KEY)", "upstream.api_key (GATEHOUSE_UPSTREAM_API_KEY)"])
        #expect(error?.description.contains("sk-") == false)
        // Spaces around a key: HTTP strips them from the header, so nobody could present it.
        var spaced = GatehouseConfig()
        _ = spaced.apply(yaml: "auth: {api_key: ' sek ret '}\n", file: "g.yaml")
        let spacedError = #expect(throws: ConfigProblems.self) { try spaced.validate() }
        #expect(spacedError?.description == "config: key 'auth.api_key (API_KEY)': begins or ends with a space, which HTTP strips from header values")
    }

    @Test func environmentValuesLoseTheirLineBreaksAndTimeoutsMustBePositive() {
        // A key mounted from a file (Kubernetes' secrets) ends with a line break.
        var config = GatehouseConfig()
        #expect(config.apply(environment: ["API_KEY": "sk-client\n", "GATEHOUSE_UPSTREAM_API_KEY": "sk-up\r\n"]).isEmpty)
        #expect(config.apiKey == "sk-client" && config.upstream.apiKey == "sk-up")
        #expect((try? config.validate()) != nil)
        // Zero was accepted and failed every request (LlamaGate's Go client read it as "never").
        #expect(config.apply(environment: ["TIMEOUT": "0"]).map(\.description) == ["environment: key 'TIMEOUT': \(mustBePositiveDuration)"])
        let zeros = config.apply(yaml: "upstream: {timeout: 0s, connect_timeout: 0}\nplugins: {echo: {timeout: 0}}\n", file: "g.yaml").map(\.key)
        #expect(zeros == ["upstream.timeout", "upstream.connect_timeout", "plugins.echo.timeout"])
        // Gatehouse's own variable wins over OLLAMA_HOST, which is often set for Ollama itself.
        _ = config.apply(environment: ["OLLAMA_HOST": "0.0.0.0", "GATEHOUSE_UPSTREAM_URL": "http://llm:8000/v1"])
        #expect(config.upstream.url == "http://llm:8000")
        // Quoted, a number or boolean is text: the message says so, rather than "must be true or
        // false (got "false")". Hexadecimal is no rate, though Double() reads it.
        var quoted = GatehouseConfig()
        let quotedProblems = quoted.apply(yaml: "cache: {enabled: \"false\"}\nserver: {port: '8080'}\n", file: "g.yaml").map(\.message)
        #expect(quotedProblems.count == 2 && quotedProblems.allSatisfy { $0.contains("in quotes, which YAML reads as text") }, "\(quotedProblems)")
        #expect(quoted.apply(environment: ["RATE_LIMIT_RPS": "0x10"]).map(\.key) == ["RATE_LIMIT_RPS"])
        // Read as Ollama reads it: quotes dropped, a bare IPv6 address one host, no host this machine.
        for (given, url) in [("::1", "http://[::1]:11434"), (":1234", "http://127.0.0.1:1234"), ("'10.0.0.5'", "http://10.0.0.5:11434"),
                             ("\"[fd00::5]:9000\"", "http://[fd00::5]:9000")] {
            var ollama = GatehouseConfig()
            #expect(ollama.apply(environment: ["OLLAMA_HOST": given]).isEmpty, "\(given)")
            #expect(ollama.upstream.url == url)
        }
        // Typos that started up with a mangled upstream (host "https", port 11434; a space encoded).
        for given in ["https//api.openai.com/v1", "http:/127.0.0.1:8000", "http://127.0.0.1:8000/v1 x"] {
            var typo = GatehouseConfig()
            let problems = typo.apply(environment: ["GATEHOUSE_UPSTREAM_URL": given])
            #expect(problems.map(\.key) == ["GATEHOUSE_UPSTREAM_URL"], "\(given): \(typo.upstream.url)")
        }
        // A port no TCP connection can have (the first readiness probe crashed the gateway).
        for (key, given) in [("GATEHOUSE_UPSTREAM_URL", "http://127.0.0.1:99999"), ("GATEHOUSE_UPSTREAM_URL", "http://[::1]:0/v1"),
                             ("OLLAMA_HOST", "127.0.0.1:65536")] {
            var outOfRange = GatehouseConfig()
            let problems = outOfRange.apply(environment: [key: given])
            #expect(problems.map(\.key) == [key], "\(given): \(outOfRange.upstream.url)")
            #expect(problems.first?.message.contains("which must be 1-65535") == true, "\(problems)")
        }
        var yamlPort = GatehouseConfig()
        #expect(yamlPort.apply(yaml: "upstream: {url: 'http://localhost:70000'}\n", file: "g.yaml").map(\.key) == ["upstream.url"])
    }

    @Test func loadLayersDotEnvUnderTheProcessEnvironment() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("gh-config-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let yaml = directory.appendingPathComponent("gatehouse.yaml").path
        let dotEnv = directory.appendingPathComponent(".env").path
        try "server: {port: 1000}\nauth: {api_key: from-yaml}\n".write(toFile: yaml, atomically: true, encoding: .utf8)
        try "# comment\nexport PORT=2000\nAPI_KEY=\"from-dotenv\"\nRATE_LIMIT_RPS=3 # inline\n".write(toFile: dotEnv, atomically: true, encoding: .utf8)
        let config = try GatehouseConfig.load(file: yaml, dotEnvFile: dotEnv, environment: ["PORT": "3000"])
        #expect(config.port == 3000)
        #expect(config.apiKey == "from-dotenv")
        #expect(config.rateLimit.requestsPerSecond == 3)
        // An empty variable is unset, as against the YAML: it took `.env`'s key away, and with it
        // authentication (compose passes `${API_KEY}` empty when the host has none).
        let unset = try GatehouseConfig.load(file: yaml, dotEnvFile: dotEnv, environment: ["API_KEY": "", "PORT": " ", "GATEHOUSE_PLUGIN_X_PREFIX": ""])
        #expect(unset.apiKey == "from-dotenv" && unset.port == 2000)
        // A plugin's variable set empty is a value (the empty string), as it is in `.env`.
        #expect(unset.pluginEnvironment["GATEHOUSE_PLUGIN_X_PREFIX"] == "")
        // A bad value is blamed on where it was set: the `.env` file, unless the environment overrides it.
        try "PORT=abc\nTIMEOUT=0\n".write(toFile: dotEnv, atomically: true, encoding: .utf8)
        #expect(throws: ConfigProblems.self) { try GatehouseConfig.load(file: yaml, dotEnvFile: dotEnv, environment: [:]) }
        do {
            _ = try GatehouseConfig.load(file: yaml, dotEnvFile: dotEnv, environment: ["TIMEOUT": "-1"])
            Issue.record("a bad PORT and TIMEOUT were taken")
        } catch let problems as ConfigProblems {
            #expect(problems.problems.map { "\($0.file) \($0.key)" } == ["\(dotEnv) PORT", "environment TIMEOUT"])
        }
    }

    @Test func dotEnvReadsCRLFQuotesCommentsAndEscapesAsDotenvDoes() {
        let text = "\u{FEFF}# saved on Windows\r\nAPI_KEY=secret\r\nPORT=9000\r\n\r\nexport\tDEBUG=true # on\r\n"
            + "GATEHOUSE_HOST='0.0.0.0' # all\nLOG_FILE=\"/var/log/gh #1.log\"\nA=\"tab\\there \\\"q\\\" \\\\ \\x\"\nB=x#y\nC=\nD = spaced \n"
        let (values, problems) = parseDotEnv(text, file: ".env")
        #expect(problems.isEmpty, "\(problems)")
        #expect(values["API_KEY"] == "secret")
        #expect(values["PORT"] == "9000")
        #expect(values["DEBUG"] == "true")
        #expect(values["GATEHOUSE_HOST"] == "0.0.0.0")
        #expect(values["LOG_FILE"] == "/var/log/gh #1.log")
        #expect(values["A"] == "tab\there \"q\" \\ \\x")
        #expect(values["B"] == "x#y")
        #expect(values["C"] == "")
        #expect(values["D"] == "spaced")
        #expect(values.count == 9)
    }

    @Test func dotEnvQuotedValuesMaySpanLines() {
        // A PEM key as another tool keeps it; the lines after it are read as usual.
        let text = "CERT=\"-----BEGIN X-----\nAAAA\n-----END X-----\"\nPORT=9000\nSQL='a\r\nb' # two lines\nAPI_KEY=k\n"
        let (values, problems) = parseDotEnv(text, file: ".env")
        #expect(problems.isEmpty, "\(problems)")
        #expect(values["CERT"] == "-----BEGIN X-----\nAAAA\n-----END X-----")
        #expect(values["SQL"] == "a\nb")
        #expect(values["PORT"] == "9000" && values["API_KEY"] == "k")
    }

    @Test func dotEnvExpandsBracedVariablesOutsideSingleQuotes() {
        let text = "HOST=10.0.0.5\nOLLAMA_HOST=http://${HOST}:11434\nKEY=\"${SECRET}\"\nRAW='${HOST}'\nPRICE=\\$5 \"x\"\nQUOTED=\"cost \\${HOST}\"\nDEF=${MISSING:-fallback}\nNONE=a${MISSING}b\nHALF=\"a${HOST\" # }\n"
        let (values, problems) = parseDotEnv(text, file: ".env", environment: ["SECRET": "from-env"])
        #expect(problems.isEmpty, "\(problems)")
        #expect(values["OLLAMA_HOST"] == "http://10.0.0.5:11434")
        #expect(values["KEY"] == "from-env")
        #expect(values["RAW"] == "${HOST}")
        #expect(values["PRICE"] == "$5 \"x\"")
        #expect(values["QUOTED"] == "cost ${HOST}")
        #expect(values["DEF"] == "fallback")
        #expect(values["NONE"] == "ab")
        #expect(values["HALF"] == "a${HOST")  // a reference does not run past the closing quote
    }

    @Test func dotEnvLinesItCannotReadAreProblemsWithTheirLine() {
        // Another tool's keys (dots, dashes) are no problem; a name with a space or an empty one is.
        let text = "OK=1\nno equals sign\nBAD KEY=1\nspring.datasource-url=x\nOPEN=\"never closed\nAFTER='x' y\n=v\nAPI_KEY: c2VjcmV0LXRva2Vu==\n"
        let (values, problems) = parseDotEnv(text, file: ".env")
        #expect(values == ["OK": "1", "spring.datasource-url": "x"])
        #expect(problems.map(\.description) == [
            ".env:2: expected KEY=value",
            ".env:3: the name before '=' holds spaces or quotes after 'BAD'",
            ".env:5: key 'OPEN': the value's opening \" is never closed",
            ".env:6: key 'AFTER': unexpected text after the quoted value's closing quote (only a # comment may follow it)",
            ".env:7: the name before '=' is empty",
            // Not the value: a YAML-style line reads as a name up to the key's padding, which
            // must not be printed.
            ".env:8: 'API_KEY' is followed by a colon: .env lines are KEY=value, not YAML's KEY: value",
        ])
    }

    @Test func missingExplicitConfigFileIsAnError() {
        #expect(throws: ConfigProblems.self) {
            try GatehouseConfig.load(file: "/nonexistent/gatehouse.yaml", environment: [:])
        }
    }

    @Test func durations() {
        #expect(parseDuration("30") == 30)
        #expect(parseDuration("250ms") == 0.25)
        #expect(parseDuration("1m30s") == 90)
        #expect(parseDuration("2h") == 7200)
        #expect(parseDuration("soon") == nil)
        #expect(parseDuration("5x") == nil)
        #expect(parseDuration("-1") == nil)
        // Values that Double() takes but no timeout can hold: they must fail start-up, not trap later.
        for text in ["inf", "infinity", "nan", "1e30", "0x10", "1e10", "10000000000", "400d", "9000h", "1e3s", ""] {
            #expect(parseDuration(text) == nil, "\(text)")
        }
        #expect(parseDuration("8760h") == maxDurationSeconds)
        #expect(parseDuration("8761h") == nil)
    }

    @Test func nonFiniteOrHugeNumbersFailStartUpNamingTheKey() {
        var config = GatehouseConfig()
        let problems = config.apply(environment: ["TIMEOUT": "inf", "SHUTDOWN_TIMEOUT": "1e10", "RATE_LIMIT_RPS": "inf"]).map(\.description)
        #expect(problems.contains { $0.hasPrefix("environment: key 'TIMEOUT': must be a duration") && $0.contains("at most 365 days") })
        #expect(problems.contains { $0.hasPrefix("environment: key 'SHUTDOWN_TIMEOUT': must be a duration") })
        #expect(problems.contains { $0.hasPrefix("environment: key 'RATE_LIMIT_RPS': must be a number") })
        var fromYAML = GatehouseConfig()
        let yamlProblems = fromYAML.apply(yaml: "upstream: {timeout: .inf}\nrate_limit: {requests_per_second: .inf}\n", file: "g.yaml").map(\.description)
        #expect(yamlProblems.count == 2, "\(yamlProblems)")
        #expect(yamlProblems.contains { $0.contains("upstream.timeout") && $0.contains("must be a duration") })
        #expect(yamlProblems.contains { $0.contains("rate_limit.requests_per_second") && $0.contains("must be a number") })
    }

    /// Checks that each key of `cases`, as the environment `variable` (and, when `yaml`, as
    /// `upstream.url`), becomes the upstream URL that is its value.
    func expectUpstreamURLs(_ cases: [String: String], variable: String, yaml: Bool) {
        for (value, expected) in cases {
            var fromEnvironment = GatehouseConfig()
            #expect(fromEnvironment.apply(environment: [variable: value]).isEmpty)
            #expect(fromEnvironment.upstream.url == expected, "\(value)")
            guard yaml else { continue }
            var fromYAML = GatehouseConfig()
            #expect(fromYAML.apply(yaml: "upstream: {url: \"\(value)\"}\n", file: "g.yaml").isEmpty)
            #expect(fromYAML.upstream.url == expected, "\(value)")
        }
    }

    @Test func upstreamURLsAreReadAsOllamaReadsThemWithoutAFinalV1() {
        // Ollama's own reading of OLLAMA_HOST: a bare host gets 11434; an explicit scheme keeps
        // the scheme's port, as in any URL.
        expectUpstreamURLs([
            "10.1.2.3": "http://10.1.2.3:11434", "localhost:8080": "http://localhost:8080",
            "[::1]": "http://[::1]:11434", "[::1]:9000": "http://[::1]:9000",
            "http://ollama.internal": "http://ollama.internal", "https://api.example.com/": "https://api.example.com",
        ], variable: "OLLAMA_HOST", yaml: false)
        // A final /v1, as OpenAI's SDKs and vLLM's and llama.cpp's docs spell base URLs, is
        // dropped: the gateway adds the API paths itself.
        expectUpstreamURLs([
            "https://api.openai.com/v1": "https://api.openai.com", "http://127.0.0.1:8000/v1/": "http://127.0.0.1:8000",
            "https://api.groq.com/openai/v1": "https://api.groq.com/openai", "http://h:1/llm/": "http://h:1/llm",
            "http://h:1/v10": "http://h:1/v10", "http://[::1]:8080/v1": "http://[::1]:8080",
        ], variable: "GATEHOUSE_UPSTREAM_URL", yaml: true)
    }

    @Test func openAIRoutesGoUnderV1UnlessTheURLNamesAnAPIVersion() {
        let cases = [
            "https://api.openai.com/v1": "/v1", "http://127.0.0.1:8080": "/v1", "https://api.groq.com/openai/v1/": "/v1",
            "http://h:1/llm": "/v1", "http://h:1/vllm": "/v1", "http://h:1/v": "/v1", "http://h:1/v1-beta": "/v1", "http://h:1/V2": "/v1",
            // As OpenAI's SDKs take them: the URL is the API's base.
            "https://generativelanguage.googleapis.com/v1beta/openai/": "", "http://h:1/v2": "", "http://h:1/api/v1alpha1/x": "",
            "http://h:1/v1/openai": "",
        ]
        for (url, expected) in cases {
            var config = GatehouseConfig()
            #expect(config.apply(environment: ["GATEHOUSE_UPSTREAM_URL": url]).isEmpty)
            #expect(config.upstream.openAIAPIPath == expected, "\(url)")
        }
    }

    @Test func redactsSecrets() {
        #expect(Redactor.redact(key: "api_key", value: "abc") == "[REDACTED]")
        #expect(Redactor.redact(key: "Authorization", value: "Bearer x") == "[REDACTED]")
        #expect(Redactor.redact(text: "sent Bearer abc.def-123 upstream") == "sent Bearer [REDACTED] upstream")
        #expect(Redactor.redact(text: "key sk-proj-abcdef123456 leaked") == "key [REDACTED] leaked")
        #expect(Redactor.redact(text: "nothing secret") == "nothing secret")
        #expect(Redactor.redact(text: "mixed bEaReR tok.en-1 case") == "mixed bEaReR [REDACTED] case")
        #expect(Redactor.redact(key: "X-Session-TOKEN", value: "t") == "[REDACTED]")
        #expect(Redactor.redact(key: "user_api_key_hint", value: "k") == "[REDACTED]")
        #expect(Redactor.redact(key: "path", value: "/v1/chat") == "/v1/chat")
    }

    @Test func logLinesAreSortedJSONWithRedaction() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("gatehouse-log-\(UUID().uuidString).jsonl").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        var handler = JSONLogHandler(label: "test", level: .info, sink: try LogSink.file(path))
        handler[metadataKey: "request_id"] = "r-1"
        handler[metadataKey: "method"] = "GET"
        handler.log(
            event: LogEvent(
                level: .error, message: "said \"hi\"\n", metadata: ["method": "POST", "api_key": "k", "zeta": "z", "ts": "ignored"],
                source: "test", file: "Sources/Host/Thing.swift", function: "f", line: 7))
        let text = try String(contentsOfFile: path, encoding: .utf8)
        #expect(text.hasSuffix("}\n") && text.filter { $0 == "\n" }.count == 1)
        let object = try #require(JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: String])
        #expect(object["msg"] == "said \"hi\"\n" && object["method"] == "POST" && object["api_key"] == "[REDACTED]")
        #expect(object["request_id"] == "r-1" && object["source"] == "Thing.swift:7" && object["label"] == "test")
        let order = text.matches(of: /"([a-z_]+)":"/).map { String($0.1) }
        #expect(order == ["api_key", "label", "level", "method", "msg", "request_id", "source", "ts", "zeta"])
        #expect(try #require(object["ts"]).wholeMatch(of: /\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z/) != nil)
    }

    @Test func accessLinesMatchTheGenericLine() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("gatehouse-log-\(UUID().uuidString).jsonl").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let sink = try LogSink.file(path)
        var routed = JSONLogHandler(label: "gatehouse", level: .info, sink: sink)
        routed[metadataKey: "request_id"] = "r-9"
        routed[metadataKey: "status"] = "overridden"
        let metadata: Logger.Metadata = ["method": "POST", "path": "/v1/x?key=sk-abcdefgh123", "status": .stringConvertible(201), "latency_ms": "1.005", "client": "10.0.0.7"]
        routed.log(event: LogEvent(level: .info, message: "request", metadata: metadata, source: "s", file: "f", function: "f", line: 1))
        routed.logAccess(method: "POST", path: "/v1/x?key=sk-abcdefgh123", status: 201, latency: .microseconds(1005), requestID: nil, client: "10.0.0.7")
        // The pass-through's way: the id given directly, not in the handler's metadata.
        var plain = JSONLogHandler(label: "gatehouse", level: .info, sink: sink)
        plain[metadataKey: "status"] = "overridden"
        plain.logAccess(method: "POST", path: "/v1/x?key=sk-abcdefgh123", status: 201, latency: .microseconds(1005), requestID: "r-9", client: "10.0.0.7")
        // The usual metadata (none, or only the request id) takes the direct way; same line.
        routed[metadataKey: "status"] = nil
        plain[metadataKey: "status"] = nil
        routed.log(event: LogEvent(level: .info, message: "request", metadata: metadata, source: "s", file: "f", function: "f", line: 1))
        routed.logAccess(method: "POST", path: "/v1/x?key=sk-abcdefgh123", status: 201, latency: .microseconds(1005), requestID: nil, client: "10.0.0.7")
        plain.logAccess(method: "POST", path: "/v1/x?key=sk-abcdefgh123", status: 201, latency: .microseconds(1005), requestID: "r-9", client: "10.0.0.7")
        let lines = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").map { $0.replacing(/"ts":"[^"]*"/, with: "") }
        #expect(lines.count == 6 && Set(lines).count == 1)
        #expect(lines[0].contains(#""path":"/v1/x?key=[REDACTED]""#) && lines[0].contains(#""status":"201""#))
        #expect(lines[0].hasPrefix(#"{"client":"10.0.0.7","label":"gatehouse","#))
    }

    @Test func configuredKeysAreMaskedWholeOnEveryLineOfARequest() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("gatehouse-log-\(UUID().uuidString).jsonl").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let key = "sk-Client99+ClientTail42"
        var handler = JSONLogHandler(label: "gatehouse", level: .info, sink: try LogSink.file(path), secrets: SecretMask([key, "plainsecret77"]))
        // Masked by shape first, the key lost only its `sk-Client99` head; its tail was logged.
        handler.log(event: LogEvent(level: .info, message: "seen", metadata: ["detail": .string("key \(key) here")], source: "s", file: "f", function: "f", line: 1))
        handler.logAccess(method: "GET", path: "/nope/\(key)", status: 404, latency: .microseconds(5), requestID: "plainsecret77", client: "c")
        // A client's request id that is a configured key: the access line wrote it as given.
        handler[metadataKey: "request_id"] = "plainsecret77"
        handler.log(event: LogEvent(level: .info, message: "other line", metadata: nil, source: "s", file: "f", function: "f", line: 1))
        let text = try String(contentsOfFile: path, encoding: .utf8)
        #expect(!text.contains("ClientTail42") && !text.contains("plainsecret77"), "\(text)")
        #expect(text.contains(#""detail":"key [REDACTED] here""#) && text.contains(#""path":"/nope/[REDACTED]""#))
        #expect(text.components(separatedBy: #""request_id":"[REDACTED]""#).count == 3)
    }

    @Test func aStreamsAccessLineCarriesItsTimeToFirstByteAsTheGenericLineWould() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("gatehouse-log-\(UUID().uuidString).jsonl").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let sink = try LogSink.file(path)
        var handler = JSONLogHandler(label: "gatehouse", level: .info, sink: sink)
        let metadata: Logger.Metadata = [
            "method": "POST", "path": "/v1/chat/completions", "status": "200", "latency_ms": "1500.250", "ttfb_ms": "12.005", "client": "10.0.0.7",
            "request_id": "r-5",
        ]
        handler.log(event: LogEvent(level: .info, message: "request", metadata: metadata, source: "s", file: "f", function: "f", line: 1))
        // The direct way (no handler metadata), then the field-list way (other metadata present).
        handler.logAccess(
            method: "POST", path: "/v1/chat/completions", status: 200, latency: .microseconds(1_500_250), firstByte: .microseconds(12005), requestID: "r-5",
            client: "10.0.0.7")
        handler[metadataKey: "status"] = "overridden"
        handler.logAccess(
            method: "POST", path: "/v1/chat/completions", status: 200, latency: .microseconds(1_500_250), firstByte: .microseconds(12005), requestID: "r-5",
            client: "10.0.0.7")
        let lines = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").map { $0.replacing(/"ts":"[^"]*"/, with: "") }
        #expect(lines.count == 3 && Set(lines).count == 1, "\(lines)")
        #expect(lines[0].hasSuffix(#","ttfb_ms":"12.005"}"#))
    }

    @Test func linesLoggedOnAnEventLoopAreWrittenInOrderAtTheEndOfItsRound() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("gatehouse-log-\(UUID().uuidString).jsonl").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let handler = JSONLogHandler(label: "loop", level: .info, sink: try LogSink.file(path))
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let long = String(repeating: "x", count: Int(PIPE_BUF))  // longer than one write may be
        let lineCounts = try group.next().submit { () -> Int in
            for index in 0..<40 { handler.logAccess(method: "GET", path: "/\(index)", status: 200, latency: .microseconds(1), requestID: nil, client: "127.0.0.1") }
            handler.log(event: LogEvent(level: .info, message: "\(long)", metadata: nil, source: "s", file: "f", function: "f", line: 1))
            handler.logAccess(method: "GET", path: "/last", status: 200, latency: .microseconds(1), requestID: nil, client: "127.0.0.1")
            // Still in the loop's round: the long line went out after the lines before it; the last waits.
            return (try? String(contentsOfFile: path, encoding: .utf8))?.split(separator: "\n").count ?? 0
        }.wait()
        #expect(lineCounts == 41)
        try group.next().submit {}.wait()  // the round has ended
        let lines = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n")
        let paths = lines.compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: String] }.map { $0["path"] ?? "long" }
        #expect(paths == (0..<40).map { "/\($0)" } + ["long", "/last"])
    }

    @Test func linesFromManyThreadsStayWholeOnAPipeWithASlowReader() throws {
        // A pipe takes a write over PIPE_BUF in pieces while its reader is slow: short lines
        // from an event loop landed between them (stdout piped to journald or docker, say).
        var ends: [Int32] = [0, 0]
        #expect(pipe(&ends) == 0)
        let sink = LogSink(handle: FileHandle(fileDescriptor: ends[1], closeOnDealloc: false), path: nil)
        let handler = JSONLogHandler(label: "pipe", level: .info, sink: sink)
        let reading = FileHandle(fileDescriptor: ends[0], closeOnDealloc: true)
        let received = Mutex(Data())
        let reader = Thread {
            while true {
                let chunk = reading.readData(ofLength: 4096)
                if chunk.isEmpty { return }
                received.withLock { $0.append(chunk) }
                usleep(200)
            }
        }
        reader.start()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let long = String(repeating: "x", count: 20_000)
        let writers = (0..<2).map { index in
            group.next().submit {
                for line in 0..<300 {
                    handler.logAccess(method: "GET", path: "/\(index)/\(line)", status: 200, latency: .microseconds(1), requestID: nil, client: "127.0.0.1")
                }
            }
        }
        for _ in 0..<30 { handler.log(event: LogEvent(level: .info, message: "\(long)", metadata: nil, source: "s", file: "f", function: "f", line: 1)) }
        for writer in writers { try writer.wait() }
        try group.syncShutdownGracefully()  // the loops' last rounds have been written
        close(ends[1])  // the reader's end of file
        while !reader.isFinished { usleep(1000) }
        let lines = received.withLock { $0 }.split(separator: UInt8(ascii: "\n"))
        let broken = lines.filter { (try? JSONSerialization.jsonObject(with: Data($0))) == nil }
        #expect(lines.count == 630 && broken.isEmpty, "\(lines.count) lines, \(broken.count) not JSON")
    }

    @Test func requestIDsAreUUIDShapedAndDistinct() {
        let ids = (0..<1000).map { _ in RequestIDGenerator.next() }
        #expect(Set(ids).count == 1000)
        for id in ids.prefix(50) {
            #expect(UUID(uuidString: id) != nil)
            #expect(id.wholeMatch(of: /[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}/) != nil)
        }
    }

    @Test func hexDigitsComputedMatchTheTable() {
        #expect((0..<16).map(Hex.digit) == Hex.digits)
        #expect(String(decoding: (0..<16).map(Hex.digit), as: UTF8.self) == "0123456789abcdef")
    }

    @Test func passThroughTargets() throws {
        let plain = try #require(UpstreamTarget(url: "http://127.0.0.1:8000/"))
        #expect(plain.host == "127.0.0.1" && plain.port == 8000 && plain.pathPrefix == "" && plain.authority == "127.0.0.1:8000")
        #expect(plain.baseURL == "http://127.0.0.1:8000")
        let prefixed = try #require(UpstreamTarget(url: "http://llm.internal/openai"))
        #expect(prefixed.port == 80 && prefixed.pathPrefix == "/openai" && prefixed.authority == "llm.internal")
        let six = try #require(UpstreamTarget(url: "http://[::1]:9000"))
        #expect(six.host == "::1" && six.authority == "[::1]:9000")
        #expect(UpstreamTarget(url: "https://api.openai.com") == nil)  // TLS upstreams stay on AsyncHTTPClient
        #expect(UpstreamTarget(url: "not a url") == nil)
        // The path as written: decoded, a space (or a line break) went into the request line.
        #expect(try #require(UpstreamTarget(url: "http://h/my%20api/")).pathPrefix == "/my%20api")
        #expect(GatehouseConfig.upstreamBaseURL("http://h/my%20api/v1/") == "http://h/my%20api")
    }
}

@Suite struct ListeningAddressTests {
    @Test func ipv6HostsAreBracketedAndBracketedOnesAreAccepted() {
        // `cannot listen on :::8080` read as nonsense, and `--host [::1]` did not resolve.
        #expect(GatehouseServer.display(host: "::", port: 8080) == "[::]:8080")
        #expect(GatehouseServer.display(host: "127.0.0.1", port: 8080) == "127.0.0.1:8080")
        #expect(GatehouseServer.display(host: "localhost", port: 80) == "localhost:80")
        #expect(GatehouseServer.unbracketed("[::1]") == "::1")
        #expect(GatehouseServer.unbracketed("::1") == "::1")
        #expect(GatehouseServer.unbracketed("example.com") == "example.com")
    }

    @Test func bindFailuresAreExplainedInOneLine() {
        let refused = GatehouseServer.explain(IOError(errnoCode: 22, reason: "bind(descriptor:ptr:bytes:)"), address: "[fe80::1]:8080")
        #expect("\(refused)".hasPrefix("cannot listen on [fe80::1]:8080: the system refuses this address"))
        let taken = GatehouseServer.explain(IOError(errnoCode: 98, reason: "bind(descriptor:ptr:bytes:)"), address: "127.0.0.1:8080")
        #expect("\(taken)" == "cannot listen on 127.0.0.1:8080: the address is already in use (another Gatehouse may be running on 127.0.0.1:8080)")
    }
}
