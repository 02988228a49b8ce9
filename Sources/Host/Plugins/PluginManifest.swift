// Plugin manifests (`plugins.d/<name>/plugin.yaml`): strict parsing and validation.
public import Foundation
internal import Yams

/// What a plugin's `plugin.yaml` declares.
///
/// ```yaml
/// name: echo            # must equal the directory name; [a-z0-9][a-z0-9_-]*
/// version: 1.0.0
/// abi: 1                # ABI major the library was built for
/// library: libecho.so   # relative to the plugin directory, never outside it
/// sha256: 9f86d0…       # optional pin of the library's bytes
/// toolchain: swift-6.3.1 # Swift plugins: the toolchain they were built with
/// description: Echoes request bodies
/// config: {greeting: hi} # defaults, overridden by gatehouse.yaml and the environment
/// rate_limit: 20        # optional: requests/s per client on the plugin's routes
/// timeout: 30s          # optional: how long the plugin may take to answer
/// ```
public struct PluginManifest: Sendable, Equatable {
    public static let fileName = "plugin.yaml"
    static let keys: Set<String> = [
        "name", "version", "abi", "library", "sha256", "description", "toolchain", "config", "rate_limit", "timeout",
    ]

    public var name: String
    public var version: String
    public var abi: Int
    public var library: String
    public var sha256: String?
    public var description: String?
    public var toolchain: String?
    /// Default configuration as JSON object text.
    public var configJSON: Data
    /// Default requests/s per client on the plugin's routes.
    public var rateLimit: Double?
    /// Default seconds the plugin may take to answer.
    public var timeout: Double?
    /// The plugin's directory (the manifest's parent).
    public var directory: String

    /// The manifest file's path.
    public var file: String { (directory as NSString).appendingPathComponent(Self.fileName) }

    /// Reads and validates `<directory>/plugin.yaml`.
    /// - Throws: `ConfigProblems` listing every problem, each naming the file and key.
    public static func load(directory: String) throws -> PluginManifest {
        let file = (directory as NSString).appendingPathComponent(fileName)
        let data: Data
        var info = stat()
        guard lstat(file, &info) == 0 else {
            throw ConfigProblems(problems: [ConfigProblem(file: file, key: "", line: nil, message: "cannot read the manifest: \(errnoText())")])
        }
        do {
            // The manifest pins the library's hash and names it, and holds the plugin's config:
            // it passes the library's own file checks (no link, no writer but root or us).
            data = try PluginLibraryVerifier.readChecked(file, what: "manifest")
        } catch let error as PluginLoadError {
            throw ConfigProblems(problems: [ConfigProblem(file: file, key: "", line: nil, message: error.reason)])
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw ConfigProblems(problems: [ConfigProblem(file: file, key: "", line: nil, message: "is not UTF-8 text")])
        }
        return try parse(text, file: file, directory: directory)
    }

    /// Validates manifest text. `directory` is where the plugin lives; its last component
    /// must equal `name`.
    public static func parse(_ text: String, file: String, directory: String) throws -> PluginManifest {
        let reader = YAMLReader(file: file)
        guard let root = reader.root(of: text) else { throw ConfigProblems(problems: reader.problems) }
        reader.checkKeys(root, at: "", allowed: keys)
        let name = reader.string(root, "name", at: "", required: true) ?? ""
        let version = reader.string(root, "version", at: "", required: true) ?? ""
        let abi = reader.int(root, "abi", at: "", required: true, range: 1...1_000) ?? 0
        let library = reader.string(root, "library", at: "", required: true) ?? ""
        let sha256 = reader.string(root, "sha256", at: "")
        let description = reader.string(root, "description", at: "")
        let toolchain = reader.string(root, "toolchain", at: "")
        let rateLimit = reader.double(root, "rate_limit", at: "", minimum: 0)
        let timeout = reader.duration(root, "timeout", at: "", positive: true)
        var configJSON = Data("{}".utf8)
        if let configNode = reader.node(root, "config") {
            if configNode.mapping != nil {
                let problemsBefore = reader.problems.count
                let value = reader.jsonValue(configNode, at: "config")
                // Each non-finite number is its own problem, named by key, above.
                if reader.problems.count == problemsBefore, let json = try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys]) {
                    configJSON = json
                }
            } else {
                reader.problem("config", configNode, "must be a mapping of default settings")
            }
        }

        if !name.isEmpty {
            if !isValidName(name) {
                reader.problem("name", root["name"], "must match [a-z0-9][a-z0-9_-]* and be at most 64 characters (got \"\(name)\")")
            } else if name != (directory as NSString).lastPathComponent {
                reader.problem("name", root["name"], "must equal the plugin's directory name \"\((directory as NSString).lastPathComponent)\" (got \"\(name)\")")
            }
        }
        if version.contains(where: \.isWhitespace) {
            reader.problem("version", root["version"], "must not contain whitespace (got \"\(version)\")")
        }
        if !library.isEmpty {
            let components = library.split(separator: "/")
            if library.hasPrefix("/") {
                reader.problem("library", root["library"], "must be a path relative to the plugin directory (got \"\(library)\")")
            } else if components.contains("..") {
                reader.problem("library", root["library"], "must stay inside the plugin directory (got \"\(library)\")")
            }
        }
        if let sha256, !(sha256.count == 64 && sha256.allSatisfy { $0.isHexDigit && !$0.isUppercase }) {
            reader.problem("sha256", root["sha256"], "must be 64 lower-case hex digits (got \"\(sha256)\")")
        }
        if !reader.problems.isEmpty { throw ConfigProblems(problems: reader.problems) }
        return PluginManifest(
            name: name, version: version, abi: abi, library: library, sha256: sha256, description: description,
            toolchain: toolchain, configJSON: configJSON, rateLimit: rateLimit, timeout: timeout, directory: directory)
    }

    /// Plugin names become URL path segments and metric labels: keep them plain.
    public static func isValidName(_ name: String) -> Bool {
        guard let first = name.unicodeScalars.first, name.unicodeScalars.count <= 64 else { return false }
        func plain(_ scalar: Unicode.Scalar) -> Bool { ("a"..."z").contains(scalar) || ("0"..."9").contains(scalar) }
        return plain(first) && name.unicodeScalars.allSatisfy { plain($0) || $0 == "-" || $0 == "_" }
    }
}
