// Structured logging: one JSON object per line, secrets redacted, to stdout or a file.
internal import Foundation
public import Logging
internal import NIOPosix
internal import Synchronization
#if canImport(Glibc)
internal import Glibc
#endif

/// A swift-log handler writing JSON lines: `{"ts":…,"level":…,"msg":…,"label":…, metadata…}`,
/// keys in sorted order.
///
/// Values of sensitive keys (api keys, tokens, authorization, passwords, secrets) are replaced
/// by "[REDACTED]", and bearer tokens or `sk-…` keys inside any text are masked.
public struct JSONLogHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    let label: String
    let sink: LogSink
    /// The configured keys, masked by value wherever they appear.
    let secrets: SecretMask

    /// - Parameter secrets: the gateway's own keys (its API key, the upstream's), masked in
    ///   every line whatever their shape.
    public init(label: String, level: Logger.Level, sink: LogSink, secrets: SecretMask = SecretMask()) {
        self.label = label
        self.logLevel = level
        self.sink = sink
        self.secrets = secrets
    }

    /// `text` with secrets masked: the configured ones by value, then others by shape
    /// (`Redactor`). In that order: masked by shape first, a configured `sk-…` key with a `.`
    /// or `+` in it lost only its head, and no longer matched by value, so its tail was logged.
    private func redacted(_ text: String) -> String {
        Redactor.redact(text: secrets.mask(text))
    }

    /// The value of field `key` with secrets masked (all of it, for a key that names a secret).
    private func redacted(key: String, value: String) -> String {
        Redactor.isSensitive(key: key) ? "[REDACTED]" : redacted(value)
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    private static let reservedKeys: Set<String> = ["ts", "level", "msg", "label"]

    public func log(event: LogEvent) {
        // Bytes written by hand: this runs for every request, and Foundation's JSONSerialization,
        // date formatting and even String concatenation cost more than the rest of a proxied
        // request together.
        var fields: [(key: String, value: String)] = [
            ("level", event.level.rawValue), ("msg", redacted("\(event.message)")), ("label", label),
        ]
        fields.reserveCapacity(4 + metadata.count + (event.metadata?.count ?? 0))
        let extra = event.metadata ?? [:]
        for (key, value) in metadata where extra[key] == nil && !Self.reservedKeys.contains(key) {
            fields.append((key, redacted(key: key, value: Self.plain(value))))
        }
        for (key, value) in extra where !Self.reservedKeys.contains(key) {
            fields.append((key, redacted(key: key, value: Self.plain(value))))
        }
        if event.level >= .error, metadata["source"] == nil, extra["source"] == nil {
            fields.append(("source", "\(event.file.split(separator: "/").last ?? ""):\(event.line)"))
        }
        write(&fields)
    }

    /// The access-log line of one request: exactly the line `log(event:)` writes for
    /// `info("request", metadata: ["client", "method", "path", "status", "latency_ms"])`, with `requestID`
    /// (when given) as if it were handler metadata, but without building metadata dictionaries
    /// (every request writes one). The caller has checked the level.
    /// `firstByte`, for a streamed answer, is the time to its head and first events
    /// (`ttfb_ms`): for an LLM stream, about the time to its first token; `latency` is then the
    /// whole stream's.
    func logAccess(method: String, path: String, status: Int, latency: Duration, firstByte: Duration? = nil, requestID: String?, client: String) {
        // The usual case, no metadata but the request id: the keys' sorted order is known, so
        // the line is written straight into the sink's buffer (no field list, no sort, no copy).
        if metadata.isEmpty || (metadata.count == 1 && metadata["request_id"] != nil) {
            let id = requestID ?? metadata["request_id"].map(Self.plain)
            sink.writeLine { line in
                line.append(contentsOf: #"{"client":"#.utf8)
                Self.appendQuoted(client, to: &line)
                line.append(contentsOf: #","label":"#.utf8)
                Self.appendQuoted(label, to: &line)
                line.append(contentsOf: #","latency_ms":""#.utf8)
                Self.appendMilliseconds(latency, to: &line)
                line.append(contentsOf: #"","level":"info","method":"#.utf8)
                Self.appendQuoted(Redactor.redact(text: method), to: &line)
                line.append(contentsOf: #","msg":"request","path":"#.utf8)
                Self.appendQuoted(redacted(path), to: &line)
                if let id {
                    line.append(contentsOf: #","request_id":"#.utf8)
                    Self.appendQuoted(redacted(id), to: &line)  // as in the request's other lines
                }
                line.append(contentsOf: #","status":""#.utf8)
                Self.appendDecimal(status, to: &line)
                line.append(UInt8(ascii: "\""))
                Self.appendTimestampField(to: &line, first: false)
                if let firstByte {
                    line.append(contentsOf: #","ttfb_ms":""#.utf8)
                    Self.appendMilliseconds(firstByte, to: &line)
                    line.append(UInt8(ascii: "\""))
                }
                line.append(contentsOf: "}\n".utf8)
            }
            return
        }
        var fields: [(key: String, value: String)] = [
            ("level", "info"), ("msg", "request"), ("label", label), ("method", Redactor.redact(text: method)),
            ("path", redacted(path)), ("status", String(status)), ("latency_ms", Self.milliseconds(latency)),
            ("client", client),
        ]
        if let firstByte { fields.append(("ttfb_ms", Self.milliseconds(firstByte))) }
        for (key, value) in metadata where !Self.accessKeys.contains(key) && !Self.reservedKeys.contains(key) {
            fields.append((key, redacted(key: key, value: Self.plain(value))))
        }
        if let requestID, metadata["request_id"] == nil { fields.append(("request_id", redacted(requestID))) }
        write(&fields)
    }

    /// A duration as milliseconds with three decimals ("12.345"), the access line's latency.
    static func milliseconds(_ duration: Duration) -> String {
        var text: [UInt8] = []
        appendMilliseconds(duration, to: &text)
        return String(decoding: text, as: UTF8.self)
    }

    private static func appendMilliseconds(_ duration: Duration, to output: inout [UInt8]) {
        let microseconds = max(0, duration.components.seconds * 1_000_000 + duration.components.attoseconds / 1_000_000_000_000)
        appendDecimal(Int(microseconds / 1000), to: &output)
        output.append(UInt8(ascii: "."))
        appendDigits(Int(microseconds % 1000), width: 3, to: &output)
    }

    /// Appends the last `width` decimal digits of a non-negative value, zero-padded.
    static func appendDigits(_ value: Int, width: Int, to output: inout [UInt8]) {
        var divisor = 1
        for _ in 1..<width { divisor *= 10 }
        var rest = value
        while divisor > 0 {
            output.append(UInt8(ascii: "0") + UInt8(rest / divisor % 10))
            rest %= divisor
            divisor /= 10
        }
    }

    /// Appends a decimal integer without building a String.
    static func appendDecimal(_ value: Int, to output: inout [UInt8]) {
        guard value != 0 else { return output.append(UInt8(ascii: "0")) }
        if value < 0 { output.append(UInt8(ascii: "-")) }
        var magnitude = value.magnitude, divisor: UInt = 1
        while divisor <= magnitude / 10 { divisor *= 10 }
        while divisor > 0 {
            output.append(UInt8(ascii: "0") + UInt8(magnitude / divisor))
            magnitude %= divisor
            divisor /= 10
        }
    }

    private static let accessKeys: Set<String> = ["client", "method", "path", "status", "latency_ms", "ttfb_ms"]

    /// Writes `fields` and the timestamp as one JSON object line, keys in sorted order.
    private func write(_ fields: inout [(key: String, value: String)]) {
        fields.sort { $0.key < $1.key }
        sink.writeLine { line in Self.appendObject(fields, to: &line) }
    }

    private static func appendObject(_ fields: [(key: String, value: String)], to line: inout [UInt8]) {
        line.append(UInt8(ascii: "{"))
        var timestampWritten = false
        for (index, field) in fields.enumerated() {
            // "ts" sorts after "source" and before anything starting with "u" or later.
            if !timestampWritten, field.key > "ts" {
                appendTimestampField(to: &line, first: index == 0)
                timestampWritten = true
            }
            if index > 0 || timestampWritten { line.append(UInt8(ascii: ",")) }
            appendQuoted(field.key, to: &line)
            line.append(UInt8(ascii: ":"))
            appendQuoted(field.value, to: &line)
        }
        if !timestampWritten { appendTimestampField(to: &line, first: fields.isEmpty) }
        line.append(contentsOf: "}\n".utf8)
    }

    private static func appendTimestampField(to line: inout [UInt8], first: Bool) {
        if !first { line.append(UInt8(ascii: ",")) }
        line.append(contentsOf: #""ts":""#.utf8)
        appendTimestamp(to: &line)
        line.append(UInt8(ascii: "\""))
    }

    /// Metadata values as text (arrays and dictionaries in their Swift description).
    static func plain(_ value: Logger.Metadata.Value) -> String {
        switch value {
        case .string(let text): text
        case .stringConvertible(let convertible): convertible.description
        case .array, .dictionary: value.description
        }
    }

    /// Appends `text` as a JSON string literal: runs that need no escape are copied whole.
    static func appendQuoted(_ text: String, to output: inout [UInt8]) {
        output.append(UInt8(ascii: "\""))
        var text = text
        text.withUTF8 { bytes in
            var start = 0
            for (index, byte) in bytes.enumerated() where byte < 0x20 || byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") {
                output.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[start..<index]))
                start = index + 1
                switch byte {
                case UInt8(ascii: "\""): output.append(contentsOf: #"\""#.utf8)
                case UInt8(ascii: "\\"): output.append(contentsOf: #"\\"#.utf8)
                case UInt8(ascii: "\n"): output.append(contentsOf: #"\n"#.utf8)
                case UInt8(ascii: "\r"): output.append(contentsOf: #"\r"#.utf8)
                case UInt8(ascii: "\t"): output.append(contentsOf: #"\t"#.utf8)
                default:
                    output.append(contentsOf: #"\u00"#.utf8)
                    output.append(Hex.digits[Int(byte >> 4)])
                    output.append(Hex.digits[Int(byte & 0x0f)])
                }
            }
            output.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[start...]))
        }
        output.append(UInt8(ascii: "\""))
    }

    /// Appends UTC time as `2026-11-23T18:41:18.787Z`.
    static func appendTimestamp(to output: inout [UInt8]) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let cache = secondText.currentValue ?? {
            let created = SecondText()
            secondText.currentValue = created
            return created
        }()
        output.append(contentsOf: cache.text(for: now.tv_sec))
        appendDigits(now.tv_nsec / 1_000_000, width: 3, to: &output)
        output.append(UInt8(ascii: "Z"))
    }

    /// Each thread's `2026-11-23T18:41:18.` of the current second (gmtime_r takes a lock).
    private static let secondText = ThreadSpecificVariable<SecondText>()
}

/// The date and time of one second as a timestamp's text up to its fraction. Each is used by
/// one thread only (through the thread-specific variable).
private final class SecondText: @unchecked Sendable {
    private var second = -1
    private var bytes: [UInt8] = []

    func text(for seconds: Int) -> [UInt8] {
        guard seconds != second else { return bytes }
        second = seconds
        var seconds = seconds
        var parts = tm()
        gmtime_r(&seconds, &parts)
        bytes.removeAll(keepingCapacity: true)
        func digits(_ value: Int, _ width: Int) { JSONLogHandler.appendDigits(value, width: width, to: &bytes) }
        digits(Int(parts.tm_year) + 1900, 4)
        bytes.append(UInt8(ascii: "-"))
        digits(Int(parts.tm_mon) + 1, 2)
        bytes.append(UInt8(ascii: "-"))
        digits(Int(parts.tm_mday), 2)
        bytes.append(UInt8(ascii: "T"))
        digits(Int(parts.tm_hour), 2)
        bytes.append(UInt8(ascii: ":"))
        digits(Int(parts.tm_min), 2)
        bytes.append(UInt8(ascii: ":"))
        digits(Int(parts.tm_sec), 2)
        bytes.append(UInt8(ascii: "."))
        return bytes
    }
}

/// Where log lines go: stdout or an appended file.
///
/// Lines logged on a NIO event-loop thread (every request's access line) are collected per
/// thread and written together when the loop finishes its current round of I/O, so a busy loop
/// makes one `write(2)` for all the requests it answered in that round instead of one each
/// (nginx's `access_log … buffer=` idea, without the time-based delay: a line waits only until
/// the loop's tasks run, microseconds later). Lines from other threads are written at once.
/// A crash loses at most the lines of the loop's current round.
///
/// A `write(2)` carries whole lines, at most `PIPE_BUF` bytes of them unless one line is longer.
/// A regular file takes each write whole, whatever its size (the kernel holds the file's lock
/// for it), so lines from different threads never interleave there. A pipe or a socket (stdout
/// under systemd or Docker) takes a longer write in pieces when its reader is slow, and another
/// thread's line written between two pieces would break both: there every write holds a lock.
public final class LogSink: Sendable {
    private let handle: Mutex<FileHandle>
    /// Whether writes take the lock: the descriptor is not a regular file (see the type's doc).
    private let writesTakeLock: Atomic<Bool>
    private let descriptor: Int32
    /// The file's path; nil for standard output.
    public let path: String?
    private let pending = ThreadSpecificVariable<PendingLines>()

    public static let standardOutput = LogSink(handle: .standardOutput, path: nil)

    init(handle: FileHandle, path: String?) {
        descriptor = handle.fileDescriptor
        writesTakeLock = Atomic(!Self.isRegularFile(handle.fileDescriptor))
        self.handle = Mutex(handle)
        self.path = path
    }

    /// Opens `path` for appending (created with mode 0640 if missing).
    /// - Throws: `LogFileError` naming the path and the system's reason.
    public static func file(_ path: String) throws -> LogSink {
        LogSink(handle: FileHandle(fileDescriptor: try openForAppending(path), closeOnDealloc: true), path: path)
    }

    /// Opens the file at `path` again, and makes this sink write there from the next line on:
    /// after a log rotation (logrotate's `create` mode, or `mv` then SIGHUP) the old path names
    /// a new, empty file, while the open descriptor still wrote to the renamed one. The new file
    /// takes this sink's descriptor number (`dup2`, atomic), so writers on every thread go on:
    /// each line lands whole in the old file or the new. Does nothing for
    /// standard output.
    /// - Throws: `LogFileError` when the file cannot be opened; the sink keeps writing where it did.
    public func reopen() throws {
        guard let path else { return }
        let fresh = try Self.openForAppending(path)
        defer { close(fresh) }
        guard dup2(fresh, descriptor) >= 0 else { throw LogFileError(path: path, reason: String(cString: strerror(errno))) }
        writesTakeLock.store(!Self.isRegularFile(descriptor), ordering: .relaxed)
    }

    /// `O_APPEND`, so every write lands at the end even when another process (logrotate's
    /// `copytruncate`) has truncated the file meanwhile, instead of at a stale offset.
    private static func openForAppending(_ path: String) throws(LogFileError) -> Int32 {
        let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o640)
        guard fd >= 0 else { throw LogFileError(path: path, reason: String(cString: strerror(errno))) }
        return fd
    }

    /// Writes one line that `build` appends (whole, with its newline) to the bytes it is given:
    /// on an event-loop thread straight into that thread's pending lines, elsewhere into a new
    /// buffer written at once.
    func writeLine(_ build: (inout [UInt8]) -> Void) {
        guard let loop = MultiThreadedEventLoopGroup.currentEventLoop else {
            var line: [UInt8] = []
            line.reserveCapacity(256)
            build(&line)
            writeWithoutInterleaving(line[...])
            return
        }
        let lines: PendingLines
        if let existing = pending.currentValue {
            lines = existing
        } else {
            lines = PendingLines()
            pending.currentValue = lines
        }
        let start = lines.bytes.count
        build(&lines.bytes)
        if lines.bytes.count > Int(PIPE_BUF) {
            // The earlier lines go out first (whole lines, at most PIPE_BUF bytes together)...
            if start > 0 { writeWithoutInterleaving(lines.bytes[..<start]) }
            if lines.bytes.count - start > Int(PIPE_BUF) {
                // ...and a line too long to share a write, at once.
                writeWithoutInterleaving(lines.bytes[start...])
                lines.bytes.removeAll(keepingCapacity: true)
                return
            }
            lines.bytes.removeFirst(start)
        }
        if !lines.flushScheduled {
            lines.flushScheduled = true
            loop.execute {
                lines.flushScheduled = false
                self.writeOut(lines)
            }
        }
    }

    /// Writes a thread's pending lines (whole lines, at most PIPE_BUF bytes) with one `write(2)`.
    private func writeOut(_ lines: PendingLines) {
        guard !lines.bytes.isEmpty else { return }
        writeWithoutInterleaving(lines.bytes[...])
        lines.bytes.removeAll(keepingCapacity: true)
    }

    /// Writes, under the lock where the descriptor needs it (not a regular file: see the type's
    /// doc); held only for the `write(2)` of lines already built. Files skip it: both event loops
    /// flush every round, and waiting on each other there cost the pass-through about 4% of its
    /// requests per second (docs/PERFORMANCE.md, twentieth round).
    private func writeWithoutInterleaving(_ bytes: ArraySlice<UInt8>) {
        if writesTakeLock.load(ordering: .relaxed) {
            handle.withLock { _ in Self.write(bytes, to: descriptor) }
        } else {
            Self.write(bytes, to: descriptor)
        }
    }

    private static func isRegularFile(_ descriptor: Int32) -> Bool {
        var status = stat()
        return fstat(descriptor, &status) == 0 && (status.st_mode & S_IFMT) == S_IFREG
    }

    private static func write(_ bytes: ArraySlice<UInt8>, to descriptor: Int32) {
        bytes.withUnsafeBytes { buffer in
            var offset = 0
            while offset < buffer.count {
                let written = Glibc.write(descriptor, buffer.baseAddress! + offset, buffer.count - offset)
                if written > 0 {
                    offset += written
                } else if written < 0, errno == EINTR {
                    continue
                } else {
                    return  // a log that cannot be written must not stop the gateway
                }
            }
        }
    }
}

/// A log file that cannot be opened: its path and the system's reason.
public struct LogFileError: Error, CustomStringConvertible {
    public let path: String
    public let reason: String
    public var description: String { "cannot open \(path): \(reason)" }
}

/// One event-loop thread's lines not yet written. Only ever used on that thread (through the
/// thread-specific variable, and by the flush task that thread's loop runs).
private final class PendingLines: @unchecked Sendable {
    var bytes: [UInt8] = []
    var flushScheduled = false

    init() {
        bytes.reserveCapacity(2 * Int(PIPE_BUF))  // room for the line that overflows one write
    }
}

/// Masks secrets in log output.
public enum Redactor {
    static let sensitiveKeyParts = ["api_key", "apikey", "api-key", "authorization", "token", "secret", "password", "x-api-key"]
    private static let sensitiveKeyBytes = sensitiveKeyParts.map { Array($0.utf8) }

    static func redact(key: String, value: String) -> String {
        isSensitive(key: key) ? "[REDACTED]" : redact(text: value)
    }

    /// Whether the key names a secret (case-insensitive substring match), without allocating.
    static func isSensitive(key: String) -> Bool {
        key.utf8.withContiguousStorageIfAvailable { bytes in
            sensitiveKeyBytes.contains { containsIgnoringCase($0, in: UnsafeRawBufferPointer(bytes)) }
        } ?? sensitiveKeyBytes.contains { ByteSearch.contains($0, in: key.lowercased()) }
    }

    /// Masks `Bearer <token>` and `sk-…` style keys inside free text.
    public static func redact(text: String) -> String {
        guard mayContainSecret(text) else { return text }
        var result = text
        for pattern in [#"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"#, #"\bsk-[A-Za-z0-9_-]{6,}"#] {
            guard let regex = try? NSRegularExpression(pattern: pattern) else { continue }
            let template = pattern.hasPrefix("(?i)") ? "$1[REDACTED]" : "[REDACTED]"
            result = regex.stringByReplacingMatches(in: result, range: NSRange(result.startIndex..., in: result), withTemplate: template)
        }
        return result
    }

    private static let bearer = Array("bearer".utf8)
    private static let secretKeyPrefix = Array("sk-".utf8)

    /// One pass for the markers the patterns need: "bearer" in any case, or "sk-".
    static func mayContainSecret(_ text: String) -> Bool {
        text.utf8.withContiguousStorageIfAvailable { bytes in
            let raw = UnsafeRawBufferPointer(bytes)
            return containsIgnoringCase(bearer, in: raw) || ByteSearch.find(secretKeyPrefix, in: raw) != nil
        } ?? true
    }

    /// Whether `needle` (lower-case ASCII) occurs in `haystack`, ignoring ASCII case.
    private static func containsIgnoringCase(_ needle: [UInt8], in haystack: UnsafeRawBufferPointer) -> Bool {
        guard !needle.isEmpty, haystack.count >= needle.count else { return false }
        return needle.withUnsafeBufferPointer { needle in
            let first = needle[0], lastStart = haystack.count - needle.count
            var start = 0
            while start <= lastStart {
                if asciiLowercase(haystack[start]) == first {
                    var offset = 1
                    while offset < needle.count, asciiLowercase(haystack[start + offset]) == needle[offset] { offset += 1 }
                    if offset == needle.count { return true }
                }
                start += 1
            }
            return false
        }
    }

    private static func asciiLowercase(_ byte: UInt8) -> UInt8 {
        byte &- UInt8(ascii: "A") < 26 ? byte | 0x20 : byte
    }
}
