// Fast substring search over bytes (memmem); Foundation's generic search is far slower.
internal import CSupport
internal import Foundation
internal import NIOCore
#if canImport(Glibc)
internal import Glibc
#endif

enum ByteSearch {
    /// The offset of the first occurrence of `needle` in `haystack`, if any.
    static func find(_ needle: [UInt8], in haystack: UnsafeRawBufferPointer) -> Int? {
        guard !needle.isEmpty, let base = haystack.baseAddress, haystack.count >= needle.count else { return nil }
        // glibc's memmem (two-way search) beats memchr-on-the-first-byte when that byte is
        // common, as `"` is in JSON.
        return needle.withUnsafeBytes { pattern in
            gatehouse_memmem(base, haystack.count, pattern.baseAddress!, pattern.count).map { base.distance(to: UnsafeRawPointer($0)) }
        }
    }

    /// The offset of the first `byte` in `buffer`'s readable bytes from offset `start` on, if any
    /// (memchr: the generic collection search is slow, and far slower in debug builds).
    static func find(_ byte: UInt8, in buffer: ByteBuffer, from start: Int = 0) -> Int? {
        buffer.withUnsafeReadableBytes { bytes in
            guard let base = bytes.baseAddress, start < bytes.count else { return nil }
            return memchr(base + start, Int32(byte), bytes.count - start).map { base.distance(to: UnsafeRawPointer($0)) }
        }
    }

    static func find(_ needle: [UInt8], in data: Data) -> Int? {
        data.withUnsafeBytes { find(needle, in: $0) }
    }

    static func contains(_ needle: [UInt8], in text: String) -> Bool {
        var text = text
        return text.withUTF8 { find(needle, in: UnsafeRawBufferPointer($0)) != nil }
    }
}
