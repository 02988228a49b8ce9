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

    /// `error` as a malformed request, when it is one.
    init?(_ error: any Error) {
        switch error {
        case let rejection as MalformedRequest: self = rejection
        case let parserError as HTTPParserError: self = .parser(parserError)
        default: return nil
        }
    }

    /// The rejection of a request with this head, if its framing is faulty (the parser took it).
    init?(head: HTTPRequestHead) {
        guard head.version.major == 1, head.version.minor == 0, head.headers.contains(name: "Transfer-Encoding") else { return nil }
        self = .transferEncodingInHTTP10
    }
}
