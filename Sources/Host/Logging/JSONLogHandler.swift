// Structured logging: one JSON object per line, secrets redacted, to stdout or a file.
internal import Foundation
public import Logging
internal import Synchronization

/// A swift-log handler writing JSON lines: `{"ts":…,"level":…,"msg":…,"label":…, metadata…}`.
///
/// Values of sensitive keys (api keys, tokens, authorization, passwords, secrets) are replaced
/// by "[REDACTED]", and bearer tokens or `sk-…` keys inside any text are masked.
public struct JSONLogHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    let label: String
    let sink: LogSink

    public init(label: String, level: Logger.Level, sink: LogSink) {
        self.label = label
        self.logLevel = level
        self.sink = sink
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var object: [String: Any] = [
            "ts": Self.timestamp(), "level": event.level.rawValue, "msg": Redactor.redact(text: "\(event.message)"), "label": label,
        ]
        let merged = metadata.merging(event.metadata ?? [:]) { $1 }
        for (key, value) in merged where object[key] == nil {
            object[key] = Redactor.redact(key: key, value: Self.plain(value))
        }
        if event.level >= .error, object["source"] == nil { object["source"] = "\(event.file.split(separator: "/").last ?? ""):\(event.line)" }
        guard var data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes]) else { return }
        data.append(0x0a)
        sink.write(data)
    }

    static func plain(_ value: Logger.Metadata.Value) -> Any {
        switch value {
        case .string(let text): text
        case .stringConvertible(let convertible): convertible.description
        case .array(let values): values.map(plain)
        case .dictionary(let values): values.mapValues(plain)
        }
    }

    static func timestamp() -> String {
        Date().formatted(.iso8601.year().month().day().time(includingFractionalSeconds: true).timeZone(separator: .omitted))
    }
}

/// Where log lines go: stdout or an appended file. Writes are serialised.
public final class LogSink: Sendable {
    private let handle: Mutex<FileHandle>

    public static let standardOutput = LogSink(handle: .standardOutput)

    init(handle: FileHandle) {
        self.handle = Mutex(handle)
    }

    /// Opens `path` for appending (created with mode 0640 if missing).
    public static func file(_ path: String) throws -> LogSink {
        if !FileManager.default.fileExists(atPath: path) {
            guard FileManager.default.createFile(atPath: path, contents: nil, attributes: [.posixPermissions: 0o640]) else {
                throw CocoaError(.fileWriteUnknown, userInfo: [NSFilePathErrorKey: path])
            }
        }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        try handle.seekToEnd()
        return LogSink(handle: handle)
    }

    func write(_ data: Data) {
        handle.withLock { try? $0.write(contentsOf: data) }
    }
}

/// Masks secrets in log output.
enum Redactor {
    static let sensitiveKeyParts = ["api_key", "apikey", "api-key", "authorization", "token", "secret", "password", "x-api-key"]

    static func redact(key: String, value: Any) -> Any {
        let lowered = key.lowercased()
        if sensitiveKeyParts.contains(where: { lowered.contains($0) }) { return "[REDACTED]" }
        if let text = value as? String { return redact(text: text) }
        return value
    }

    /// Masks `Bearer <token>` and `sk-…` style keys inside free text.
    static func redact(text: String) -> String {
        guard text.contains("Bearer") || text.contains("bearer") || text.contains("sk-") else { return text }
        var result = text
        for pattern in [#"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"#, #"\bsk-[A-Za-z0-9_-]{6,}"#] {
            guard let regex = try? NSRegularExpression(pattern: pattern) else { continue }
            let template = pattern.hasPrefix("(?i)") ? "$1[REDACTED]" : "[REDACTED]"
            result = regex.stringByReplacingMatches(in: result, range: NSRange(result.startIndex..., in: result), withTemplate: template)
        }
        return result
    }
}
