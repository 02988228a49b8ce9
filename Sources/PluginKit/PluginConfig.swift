// A plugin's effective configuration (JSON from the host) with typed getters.
internal import FoundationEssentials

/// A JSON value, as found in a plugin's configuration.
public enum JSONValue: Sendable, Hashable, Codable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let value = try? container.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? container.decode(Double.self) {
            self = .number(value)
        } else if let value = try? container.decode(String.self) {
            self = .string(value)
        } else if let value = try? container.decode([JSONValue].self) {
            self = .array(value)
        } else {
            self = .object(try container.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .null: try container.encodeNil()
        case .bool(let value): try container.encode(value)
        case .number(let value): try container.encode(value)
        case .string(let value): try container.encode(value)
        case .array(let value): try container.encode(value)
        case .object(let value): try container.encode(value)
        }
    }
}

/// The plugin's configuration object: manifest `config` defaults, overridden by
/// `plugins.<name>.config` in gatehouse.yaml, overridden by `GATEHOUSE_PLUGIN_<NAME>_<KEY>`
/// environment variables.
///
/// ```swift
/// let greeting = context.config.string("greeting") ?? "hello"
/// ```
public struct PluginConfig: Sendable {
    /// The raw JSON text the host handed over.
    public let json: [UInt8]
    /// The decoded top-level object (empty if the JSON was not an object).
    public let values: [String: JSONValue]

    public init(json: [UInt8]) {
        self.json = json
        if case .object(let object)? = try? JSONDecoder().decode(JSONValue.self, from: Data(json)) {
            values = object
        } else {
            values = [:]
        }
    }

    public subscript(key: String) -> JSONValue? { values[key] }

    /// The value at `key` if it is a string (numbers and booleans are converted).
    public func string(_ key: String) -> String? {
        switch values[key] {
        case .string(let value): value
        case .number(let value): value == value.rounded() && abs(value) < 1e15 ? String(Int(value)) : String(value)
        case .bool(let value): String(value)
        default: nil
        }
    }

    /// The value at `key` if it is a whole number (or a string holding one).
    public func int(_ key: String) -> Int? {
        switch values[key] {
        case .number(let value) where value == value.rounded() && abs(value) < 9e15: Int(value)
        case .string(let value): Int(value)
        default: nil
        }
    }

    /// The value at `key` if it is a number (or a string holding one).
    public func double(_ key: String) -> Double? {
        switch values[key] {
        case .number(let value): value
        case .string(let value): Double(value)
        default: nil
        }
    }

    /// The value at `key` if it is a boolean (or the string "true"/"false").
    public func bool(_ key: String) -> Bool? {
        switch values[key] {
        case .bool(let value): value
        case .string(let value): Bool(value.lowercased())
        default: nil
        }
    }

    /// The whole configuration decoded into your own `Decodable` type.
    public func decode<T: Decodable>(_ type: T.Type) throws -> T {
        try JSONDecoder().decode(type, from: Data(json))
    }
}
