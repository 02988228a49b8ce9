// Masks the gateway's own secrets in text that came from elsewhere, before a client or a log sees it.
internal import Foundation

/// The configured secrets to mask, by value, in an upstream's words and in every log line. An
/// upstream may quote the key it was sent back in its error message ("Invalid API key: …", a
/// proxy's "auth expired for key …"), which the gateway passes on to clients and into its log;
/// a plugin may log a key from its configuration. The pattern-based `Redactor` knows `sk-…` and
/// `Bearer …` keys, not a key of any other shape.
public struct SecretMask: Sendable {
    private let secrets: [(text: String, bytes: [UInt8])]

    /// Masks each of `secrets` that is set; very short values (under 4 characters) are not
    /// masked, as they would blank out ordinary words.
    public init(_ secrets: [String?] = []) {
        // Longest first, so a key that contains another is masked whole.
        self.secrets = Set(secrets.compactMap { $0 }.filter { $0.utf8.count >= 4 }).sorted { $0.utf8.count > $1.utf8.count }.map { ($0, Array($0.utf8)) }
    }

    /// `text` with every occurrence of a secret replaced by `[REDACTED]`. Text without one (the
    /// usual case, and every log line goes through this) is checked as bytes, not copied.
    func mask(_ text: String) -> String {
        var result = text
        for secret in secrets where ByteSearch.contains(secret.bytes, in: result) {
            result = result.replacingOccurrences(of: secret.text, with: "[REDACTED]")
        }
        return result
    }

    /// `error` with its message (and `code` and `param`, which may also be the upstream's) masked.
    func masked(_ error: OpenAIError) -> OpenAIError {
        guard !secrets.isEmpty else { return error }
        var error = error
        error.message = mask(error.message)
        error.code = error.code.map(mask)
        error.param = error.param.map(mask)
        return error
    }
}
