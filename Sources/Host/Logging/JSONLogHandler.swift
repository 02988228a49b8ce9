// Structured logging: one JSON object per line, secrets redacted, to stdout or a file.
internal import Foundation
public import Logging
internal import Synchronization
#if canImport(Glibc)
internal import Glibc
#endif

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
        // Hand-written JSON: this runs for every request, and Foundation's JSONSerialization and
        // date formatting cost more than the rest of a proxied request together.
        var fields: [(String, String)] = [("ts", Self.timestamp()), ("level", event.level.rawValue)]
        fields.append(("msg", Redactor.redact(text: "\(event.message)")))
        fields.append(("label", label))
        var merged = metadata
        if let extra = event.metadata { merged.merge(extra) { $1 } }
        for (key, value) in merged where key != "ts" && key != "level" && key != "msg" && key != "label" {
            fields.append((key, Redactor.redact(key: key, value: Self.plain(value))))
        }
        if event.level >= .error, merged["source"] == nil {
            fields.append(("source", "\(event.file.split(separator: "/").last ?? ""):\(event.line)"))
        }
        fields.sort { $0.0 < $1.0 }
        var line = "{"
        for (index, (key, value)) in fields.enumerated() {
            if index > 0 { line += "," }
            Self.appendQuoted(key, to: &line)
            line += ":"
            Self.appendQuoted(value, to: &line)
        }
        line += "}\n"
        sink.write(Data(line.utf8))
    }

    /// Metadata values as text (arrays and dictionaries in their Swift description).
    static func plain(_ value: Logger.Metadata.Value) -> String {
        switch value {
        case .string(let text): text
        case .stringConvertible(let convertible): convertible.description
        case .array, .dictionary: value.description
        }
    }

    /// Appends `text` as a JSON string literal.
    static func appendQuoted(_ text: String, to output: inout String) {
        output += "\""
        var plainRun = true
        for scalar in text.unicodeScalars where scalar == "\"" || scalar == "\\" || scalar.value < 0x20 {
            plainRun = false
            break
        }
        if plainRun {
            output += text
        } else {
            for scalar in text.unicodeScalars {
                switch scalar {
                case "\"": output += "\\\""
                case "\\": output += "\\\\"
                case "\n": output += "\\n"
                case "\r": output += "\\r"
                case "\t": output += "\\t"
                case _ where scalar.value < 0x20:
                    let hex = String(scalar.value, radix: 16)
                    output += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                default: output.unicodeScalars.append(scalar)
                }
            }
        }
        output += "\""
    }

    /// UTC time as `2026-11-23T18:41:18.787Z`.
    static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var parts = tm()
        var seconds = now.tv_sec
        gmtime_r(&seconds, &parts)
        func pad(_ value: Int32, _ width: Int) -> String {
            let digits = String(value)
            return digits.count >= width ? digits : String(repeating: "0", count: width - digits.count) + digits
        }
        return "\(parts.tm_year + 1900)-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T\(pad(parts.tm_hour, 2)):"
            + "\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(Int32(now.tv_nsec / 1_000_000), 3))Z"
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

    static func redact(key: String, value: String) -> String {
        let lowered = key.lowercased()
        if sensitiveKeyBytes.contains(where: { ByteSearch.contains($0, in: lowered) }) { return "[REDACTED]" }
        return redact(text: value)
    }

    private static let sensitiveKeyBytes = sensitiveKeyParts.map { Array($0.utf8) }
    private static let markers = ["bearer", "Bearer", "BEARER", "sk-"].map { Array($0.utf8) }

    /// Masks `Bearer <token>` and `sk-…` style keys inside free text.
    static func redact(text: String) -> String {
        guard markers.contains(where: { ByteSearch.contains($0, in: text) }) else { return text }
        var result = text
        for pattern in [#"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"#, #"\bsk-[A-Za-z0-9_-]{6,}"#] {
            guard let regex = try? NSRegularExpression(pattern: pattern) else { continue }
            let template = pattern.hasPrefix("(?i)") ? "$1[REDACTED]" : "[REDACTED]"
            result = regex.stringByReplacingMatches(in: result, range: NSRange(result.startIndex..., in: result), withTemplate: template)
        }
        return result
    }
}
