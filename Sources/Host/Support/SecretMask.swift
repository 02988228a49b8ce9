// Masks the gateway's own secrets in text that came from elsewhere, before a client or a log sees it.
internal import Foundation

/// The configured secrets to mask, by value, in an upstream's words. An upstream may quote the
/// key it was sent back in its error message ("Invalid API key: …", a proxy's "auth expired for
/// key …"), and the gateway passes upstream messages on to clients and into its log: the
/// pattern-based `Redactor` knows `sk-…` and `Bearer …` keys, not a key of any other shape.
struct SecretMask: Sendable {
    private let secrets: [String]

    /// Masks each of `secrets` that is set; very short values (under 4 characters) are not
    /// masked, as they would blank out ordinary words.
    init(_ secrets: [String?] = []) {
        // Longest first, so a key that contains another is masked whole.
        self.secrets = Set(secrets.compactMap { $0 }.filter { $0.utf8.count >= 4 }).sorted { $0.utf8.count > $1.utf8.count }
    }

    /// `text` with every occurrence of a secret replaced by `[REDACTED]`.
    func mask(_ text: String) -> String {
        var result = text
        for secret in secrets where result.contains(secret) {
            result = result.replacingOccurrences(of: secret, with: "[REDACTED]")
        }
        return result
    }

    /// `error` with its message (and `param`, also the upstream's) masked.
    func masked(_ error: OpenAIError) -> OpenAIError {
        guard !secrets.isEmpty else { return error }
        var error = error
        error.message = mask(error.message)
        error.param = error.param.map(mask)
        return error
    }
}
