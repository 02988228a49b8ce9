// JSON responses, built one way for every route.
internal import Foundation
internal import HTTPTypes
internal import Hummingbird
internal import NIOCore

extension Response {
    /// A response whose body is JSON text already encoded.
    static func json(_ data: Data, status: HTTPResponse.Status = .ok) -> Response {
        Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(data: data)))
    }

    /// A response whose body is `object` (JSON-compatible Foundation values), keys sorted.
    static func json(object: Any, status: HTTPResponse.Status = .ok) throws -> Response {
        .json(try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes]), status: status)
    }
}
