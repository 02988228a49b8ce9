// Strict, problem-collecting reading of YAML files (config and plugin manifests).
internal import Foundation
internal import Yams

/// One thing wrong with a YAML file, located by file, key path and line.
public struct ConfigProblem: Error, Sendable, CustomStringConvertible, Equatable {
    public let file: String
    public let key: String
    public let line: Int?
    public let message: String

    public var description: String {
        let location = line.map { "\(file):\($0)" } ?? file
        return key.isEmpty ? "\(location): \(message)" : "\(location): key '\(key)': \(message)"
    }
}

/// Several problems at once, reported together so a user can fix them in one go.
public struct ConfigProblems: Error, Sendable, CustomStringConvertible {
    public let problems: [ConfigProblem]
    public var description: String { problems.map(\.description).joined(separator: "; ") }
}

/// Walks a YAML document, checking keys and types, and collects every problem it finds.
final class YAMLReader {
    let file: String
    private(set) var problems: [ConfigProblem] = []

    init(file: String) {
        self.file = file
    }

    /// Parses `text` into its root mapping (an empty document is an empty mapping).
    func root(of text: String) -> Node.Mapping? {
        do {
            guard let node = try Yams.compose(yaml: text) else { return Node.Mapping([]) }
            guard let mapping = node.mapping else {
                problem("", node, "the document must be a mapping of keys to values")
                return nil
            }
            return mapping
        } catch {
            let (line, reason) = Self.syntaxProblem(error)
            problems.append(ConfigProblem(file: file, key: "", line: line, message: "not valid YAML: \(reason)"))
            return nil
        }
    }

    func problem(_ key: String, _ node: Node?, _ message: String) {
        problems.append(ConfigProblem(file: file, key: key, line: node?.mark?.line, message: message))
    }

    /// Reports every key of `mapping` not in `allowed`.
    func checkKeys(_ mapping: Node.Mapping, at path: String, allowed: Set<String>) {
        for (key, _) in mapping {
            guard let name = key.string else {
                problem(path, key, "keys must be strings")
                continue
            }
            if !allowed.contains(name) {
                problem(join(path, name), key, "unknown key (allowed: \(allowed.sorted().joined(separator: ", ")))")
            }
        }
    }

    func join(_ path: String, _ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    func node(_ mapping: Node.Mapping, _ key: String) -> Node? {
        guard let value = mapping[key] else { return nil }
        if value.null != nil, value.scalar?.style == .plain { return nil }  // `key:` with no value
        return value
    }

    func mapping(_ mapping: Node.Mapping, _ key: String, at path: String) -> Node.Mapping? {
        guard let value = node(mapping, key) else { return nil }
        guard let result = value.mapping else {
            problem(join(path, key), value, "must be a mapping")
            return nil
        }
        return result
    }

    func string(_ mapping: Node.Mapping, _ key: String, at path: String, required: Bool = false) -> String? {
        guard let value = node(mapping, key) else {
            if required {
                // `name: null` (or `~`) is there, but YAML reads it as no value.
                let written = mapping[key]?.scalar.map(\.string).flatMap { $0.isEmpty ? nil : $0 }
                problem(join(path, key), mapping[key], written.map { "is required (\($0) is YAML's null: put it in quotes, \"\($0)\", for the text)" } ?? "is required")
            }
            return nil
        }
        guard let scalar = value.scalar else {
            problem(join(path, key), value, "must be a string")
            return nil
        }
        if required && scalar.string.isEmpty { problem(join(path, key), value, "must not be empty") }
        return scalar.string
    }

    func int(_ mapping: Node.Mapping, _ key: String, at path: String, required: Bool = false, range: ClosedRange<Int>? = nil) -> Int? {
        guard let value = node(mapping, key) else {
            if required { problem(join(path, key), nil, "is required") }
            return nil
        }
        guard let number = value.int else {
            problem(join(path, key), value, "must be an integer (got \(Self.describe(value, typed: true)))")
            return nil
        }
        if let range, !range.contains(number) {
            problem(join(path, key), value, "must be between \(range.lowerBound) and \(range.upperBound) (got \(number))")
            return nil
        }
        return number
    }

    func double(_ mapping: Node.Mapping, _ key: String, at path: String, minimum: Double? = nil) -> Double? {
        guard let value = node(mapping, key) else { return nil }
        guard let number = value.float ?? value.int.map(Double.init), number.isFinite else {
            problem(join(path, key), value, "must be a number (got \(Self.describe(value, typed: true)))")
            return nil
        }
        if let minimum, number < minimum {
            problem(join(path, key), value, "must be at least \(minimum) (got \(number))")
            return nil
        }
        return number
    }

    func bool(_ mapping: Node.Mapping, _ key: String, at path: String) -> Bool? {
        guard let value = node(mapping, key) else { return nil }
        guard let flag = value.bool else {
            problem(join(path, key), value, "must be true or false (got \(Self.describe(value, typed: true)))")
            return nil
        }
        return flag
    }

    /// A list of IP addresses or CIDR ranges: a YAML sequence, or one string of them separated by commas.
    func ipRanges(_ mapping: Node.Mapping, _ key: String, at path: String) -> [String]? {
        commaList(
            mapping, key, at: path, of: "IP addresses or CIDR ranges", each: "an IP address or CIDR range (like 10.0.0.0/8 or ::1)",
            isValid: { IPRange($0) != nil })
    }

    /// A list of strings, each `isValid`: a YAML sequence, or one string of them separated by
    /// commas (as the environment variable spells it). `what` names the items, `each` one of them.
    func commaList(
        _ mapping: Node.Mapping, _ key: String, at path: String, of what: String, each: String, isValid: (String) -> Bool
    ) -> [String]? {
        guard let value = node(mapping, key) else { return nil }
        let items: [Node]
        if let sequence = value.sequence { items = Array(sequence) } else { items = [value] }
        var list: [String] = []
        for item in items {
            guard let text = item.scalar?.string else {
                problem(join(path, key), item, "must be a list of \(what) (got \(Self.describe(item)))")
                return nil
            }
            let (parts, invalid) = Self.commaSeparated(text, isValid: isValid)
            if let invalid {
                problem(join(path, key), item, "'\(invalid)' is not \(each)")
                return nil
            }
            list += parts
        }
        return list
    }

    /// The non-empty, trimmed items of a comma-separated list, and the first that is not
    /// `isValid` (nil when all are). Shared by the YAML lists and their environment variables.
    static func commaSeparated(_ text: String, isValid: (String) -> Bool) -> (items: [String], invalid: String?) {
        let items = text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        return (items, items.first { !isValid($0) })
    }

    /// A duration: a number of seconds, or a string like "250ms", "30s", "5m", "1h".
    /// - Parameter positive: 0 is refused (a timeout of nothing would fail every request).
    func duration(_ mapping: Node.Mapping, _ key: String, at path: String, positive: Bool = false) -> Double? {
        guard let value = node(mapping, key) else { return nil }
        guard let text = value.scalar?.string, let seconds = parseDuration(text) else {
            problem(join(path, key), value, "must be a duration like 30, \"30s\", \"5m\" or \"250ms\", at most 365 days (got \(Self.describe(value)))")
            return nil
        }
        if positive && seconds == 0 {
            problem(join(path, key), value, mustBePositiveDuration)
            return nil
        }
        return seconds
    }

    /// Converts a YAML node to a JSON-compatible Foundation value (for plugin config). A number
    /// JSON cannot hold (`.inf`, `.nan`) is a problem at `path`, since it would make the whole
    /// document unwritable as JSON.
    func jsonValue(_ node: Node, at path: String) -> Any {
        switch node {
        case .mapping(let mapping):
            var object: [String: Any] = [:]
            for (key, value) in mapping {
                let name = key.string ?? ""
                object[name] = jsonValue(value, at: join(path, name))
            }
            return object
        case .sequence(let sequence):
            return sequence.enumerated().map { jsonValue($1, at: "\(path)[\($0)]") }
        case .scalar(let scalar):
            if scalar.style != .plain { return scalar.string }
            if node.null != nil { return NSNull() }
            if let flag = node.bool { return flag }
            if let number = node.int { return number }
            if let number = node.float {
                guard number.isFinite else {
                    problem(path, node, "must be a finite number (plugins read their config as JSON, which has no infinity or NaN; quote it for text)")
                    return NSNull()
                }
                return number
            }
            return scalar.string
        case .alias:
            return NSNull()
        }
    }

    /// `node` as a problem quotes it. `typed`: for a key wanting a number or boolean, a quoted
    /// scalar is said to be text, which is why it is refused (`"false"` was refused as "must be
    /// true or false (got "false")").
    static func describe(_ node: Node, typed: Bool = false) -> String {
        if let scalar = node.scalar {
            let quoted = typed && (scalar.style == .singleQuoted || scalar.style == .doubleQuoted)
            return quoted ? "\"\(scalar.string)\" in quotes, which YAML reads as text" : "\"\(scalar.string)\""
        }
        return node.mapping != nil ? "a mapping" : "a list"
    }

    /// Where a YAML syntax error is and what it is, without the document's text: Yams's own
    /// description quotes the offending line, or the whole mapping for a duplicated key, and
    /// this one goes to stderr and the journal with whatever secrets those lines hold.
    static func syntaxProblem(_ error: any Error) -> (line: Int?, reason: String) {
        func located(_ context: YamlError.Context?, _ problem: String, _ mark: Mark) -> (Int?, String) {
            let within = context.map { " (\($0.text) from line \($0.mark.line), column \($0.mark.column))" } ?? ""
            return (mark.line, "\(problem) at column \(mark.column)\(within)")
        }
        guard let error = error as? YamlError else { return (nil, String(describing: type(of: error))) }
        switch error {
        case .scanner(let context, let problem, let mark, _), .parser(let context, let problem, let mark, _),
            .composer(let context, let problem, let mark, _):
            return located(context, problem, mark)
        case .duplicatedKeysInMapping(let duplicates, let context):
            let keys = duplicates.sorted().map { "'\($0)'" }.joined(separator: ", ")
            return (context.mark.line, "the mapping holds \(keys) more than once")
        case .reader(let problem, let offset, _, _):
            return (nil, offset.map { "\(problem) at byte \($0)" } ?? problem)
        default:
            return (nil, String(describing: error).split(whereSeparator: \.isNewline).first.map(String.init) ?? "")
        }
    }
}

/// Why a timeout may not be 0 (LlamaGate's Go client read 0 as "no timeout"; here it would
/// fail every request, so it is refused rather than read either way).
let mustBePositiveDuration = "must be more than 0 (for a wait as long as the upstream takes, give a long one, like 1h)"

/// The longest duration a setting accepts. Timeouts become 64-bit nanosecond counts, which
/// overflow (and trap) beyond about 292 years; a year is already "never" for a gateway.
let maxDurationSeconds = 365.0 * 24 * 3600

/// Parses "30", "30s", "250ms", "5m", "1h", "1m30s" into seconds; nil for anything else,
/// including negative, non-finite ("inf", "nan") and longer than `maxDurationSeconds`.
func parseDuration(_ text: String) -> Double? {
    let trimmed = text.trimmingCharacters(in: .whitespaces)
    // Digits, dots and unit letters only; a bare number is digits and dots, because Double("…")
    // would also take "inf", "nan", "1e30" and hex floats.
    guard !trimmed.isEmpty, trimmed.allSatisfy({ $0.isASCII && ($0.isNumber || $0.isLetter || $0 == ".") }) else { return nil }
    if trimmed.allSatisfy({ $0.isNumber || $0 == "." }) {
        guard let seconds = Double(trimmed), seconds <= maxDurationSeconds else { return nil }
        return seconds
    }
    var total = 0.0
    var number = ""
    var index = trimmed.startIndex
    var sawUnit = false
    while index < trimmed.endIndex {
        let character = trimmed[index]
        if character.isNumber || character == "." {
            number.append(character)
            index = trimmed.index(after: index)
            continue
        }
        var unit = ""
        while index < trimmed.endIndex, trimmed[index].isLetter {
            unit.append(trimmed[index])
            index = trimmed.index(after: index)
        }
        guard let value = Double(number) else { return nil }
        let scale: Double
        switch unit {
        case "ms": scale = 0.001
        case "s": scale = 1
        case "m": scale = 60
        case "h": scale = 3600
        default: return nil
        }
        total += value * scale
        number = ""
        sawUnit = true
    }
    return sawUnit && number.isEmpty && total <= maxDurationSeconds ? total : nil
}
