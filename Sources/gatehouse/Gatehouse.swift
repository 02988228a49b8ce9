// The gatehouse executable: argument parsing, then the Host library does the work.
import ArgumentParser
import Foundation
import Host
import Logging

@main
struct Gatehouse: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gatehouse",
        abstract: "An OpenAI-compatible LLM gateway with a native plugin host.",
        version: GatehouseVersion.description,
        subcommands: [Serve.self, Plugins.self],
        defaultSubcommand: Serve.self)
}

/// Options shared by every subcommand that reads the configuration.
struct ConfigOptions: ParsableArguments {
    @Option(name: .long, help: "YAML configuration file (default: gatehouse.yaml if present).")
    var config: String?

    @Option(name: .long, help: "Directory of plugins, one sub-directory with a plugin.yaml each (default: plugins.d).")
    var pluginsDir: String?

    func load() throws -> GatehouseConfig {
        var loaded = try GatehouseConfig.load(file: config)
        if let pluginsDir { loaded.pluginsDirectory = pluginsDir }
        return loaded
    }

    /// `load()`, its problems printed as `serve` prints them (`invalidConfiguration`).
    func loadOrFail() throws -> GatehouseConfig {
        do {
            return try load()
        } catch {
            throw invalidConfiguration(error)
        }
    }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run the gateway.")

    @OptionGroup var options: ConfigOptions

    @Option(name: .long, help: "Address to bind (default: 127.0.0.1).")
    var host: String?

    @Option(name: .long, help: "Port to listen on (default: 11435).")
    var port: Int?

    func validate() throws {
        // Checked as PORT and server.port are: a larger number would be truncated to another port.
        if let port, !(0...65535).contains(port) { throw ValidationError("--port must be between 0 and 65535 (got \(port))") }
    }

    func run() async throws {
        let config: GatehouseConfig
        do {
            var loaded = try options.load()
            if let host { loaded.host = host }
            if let port { loaded.port = port }
            try loaded.validate()  // here, so its problems read as the others do, before logging starts
            config = loaded
        } catch {
            throw invalidConfiguration(error)
        }
        let sink: LogSink
        do {
            sink = try config.logFile.map(LogSink.file) ?? .standardOutput
        } catch {
            throw fail("cannot open log file \(config.logFile ?? "") (logging.file, LOG_FILE): \((error as? LogFileError)?.reason ?? "\(error)")")
        }
        let level = Logger.Level(rawValue: config.logLevel) ?? .info
        let secrets = SecretMask([config.apiKey, config.upstream.apiKey])
        LoggingSystem.bootstrap { label in JSONLogHandler(label: label, level: level, sink: sink, secrets: secrets) }
        let logger = Logger(label: "gatehouse")
        do {
            try await GatehouseServer(config: config, logger: logger, logSink: sink).run()
        } catch {
            logger.critical("gatehouse stopped", metadata: ["error": .string("\(error)")])
            throw fail("\(error)")
        }
    }
}

struct Plugins: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Inspect plugins without serving.", subcommands: [List.self, Validate.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Load every plugin as `serve` would and print its state.")

        @OptionGroup var options: ConfigOptions

        func run() async throws {
            let config = try options.loadOrFail()
            if let problem = PluginRegistry.directoryProblem(config.pluginsDirectory) {
                throw fail("cannot read the plugins directory \(config.pluginsDirectory): \(problem)")
            }
            var logger = Logger(label: "gatehouse") { _ in SwiftLogNoOpLogHandler() }
            logger.logLevel = .critical
            let registry = try PluginRegistry(config: config, logger: logger)
            registry.loadAll()
            let statuses = registry.statuses()
            if statuses.isEmpty { print("no plugins in \(config.pluginsDirectory)") }
            for status in statuses {
                let version = status.version ?? "-"
                print("\(status.name)\t\(version)\t\(status.state.rawValue)\(status.error.map { "\t\($0)" } ?? "")")
            }
            await registry.shutdownAll(drainTimeout: 0)
        }
    }

    struct Validate: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check a plugin directory (or its plugin.yaml): manifest, file safety, hash, ABI and descriptor.",
            discussion: "The library is opened from a private copy to read its descriptor; its init is not called.")

        @Argument(help: "A plugin directory or its plugin.yaml.")
        var path: String

        func run() async throws {
            var directory = path
            if (path as NSString).lastPathComponent == "plugin.yaml" { directory = (path as NSString).deletingLastPathComponent }
            if directory.isEmpty { directory = "." }
            // The manifest's name must equal the directory's: "." (run inside it) has none until resolved.
            directory = URL(fileURLWithPath: directory).standardizedFileURL.path
            do {
                let report = try PluginValidator.validate(directory: directory)
                print("ok: \(report)")
            } catch {
                throw fail("invalid: \(error)")
            }
        }
    }
}

/// Prints the configuration's problems to stderr as one line, redacted by shape (a key pasted
/// into the wrong field is quoted back as the value it got), and returns an exit code of 1.
func invalidConfiguration(_ error: any Error) -> ExitCode {
    fail("invalid configuration: \(Redactor.redact(text: "\(error)"))")
}

/// Prints `message` to stderr and returns an exit code of 1.
func fail(_ message: String) -> ExitCode {
    FileHandle.standardError.write(Data("gatehouse: \(message)\n".utf8))
    return ExitCode.failure
}
