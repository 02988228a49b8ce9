// Requests refused before any route sees them: by NIO's HTTP/1 parser, or by a framing rule it does not enforce.
internal import NIOHTTP1

/// Why a request cannot be read, after which the connection closes (the next request cannot
/// be found reliably).
enum MalformedRequest: Error, Equatable {
    /// NIO's parser (llhttp) rejected the bytes.
    case parser(HTTPParserError)
    /// An HTTP/1.0 request with `Transfer-Encoding`. llhttp decodes its chunks, but RFC 9112
    /// §6.1 says such a message's framing is faulty (1.0 has no transfer codings, so an
    /// HTTP/1.0 intermediary would frame it otherwise: the way requests are smuggled), and
    /// nginx refuses it with a 400.
    case transferEncodingInHTTP10
    /// An HTTP/1.1 request without `Host`, or any request with more than one (RFC 9112 §3.2:
    /// a server MUST answer 400; nginx does). Two hops reading two different hosts is how a
    /// request is routed past a front proxy's checks.
    case hostMissingOrRepeated
    /// A `Transfer-Encoding` with a coding other than `chunked` (`gzip, chunked`). llhttp takes
    /// it when `chunked` comes last and hands on the coded body as if it were plain; RFC 9112
    /// §6.1: a server SHOULD answer 501 to a transfer coding it does not understand.
    case unsupportedTransferCoding

    /// `error` as a malformed request, when it is one.
    init?(_ error: any Error) {
        switch error {
        case let rejection as MalformedRequest: self = rejection
        case let parserError as HTTPParserError: self = .parser(parserError)
        default: return nil
        }
    }

    /// The rejection of a request with this head, if the parser took it though it is faulty.
    init?(head: HTTPRequestHead) {
        // One pass over the fields (every request asks): the hosts, and any Transfer-Encoding.
        var hosts = 0
        var transferEncoding = false
        var otherCoding = false
        for field in head.headers {
            if HTTPHeaders.sameName(field.name, "host") {
                hosts += 1
            } else if HTTPHeaders.sameName(field.name, "transfer-encoding") {
                transferEncoding = true
                otherCoding = otherCoding || Self.namesOtherCodingThanChunked(field.value)
            }
        }
        let http11 = head.version.major == 1 && head.version.minor >= 1
        if hosts > 1 || (hosts == 0 && http11) {
            self = .hostMissingOrRepeated
        } else if transferEncoding, head.version.major == 1, head.version.minor == 0 {
            self = .transferEncodingInHTTP10
        } else if otherCoding {
            self = .unsupportedTransferCoding
        } else {
            return nil
        }
    }

    /// Whether a `Transfer-Encoding` value lists any coding but `chunked` (an empty element,
    /// which list syntax allows, is none).
    static func namesOtherCodingThanChunked(_ value: String) -> Bool {
        value.split(separator: ",").contains { element in
            let coding = HTTPHeaders.trimmingWhitespace(String(element))
            return !coding.isEmpty && !HTTPHeaders.sameName(coding, "chunked")
        }
    }
}
