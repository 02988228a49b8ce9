// Fast substring search over bytes (memchr + memcmp); Foundation's generic search is far slower.
internal import Foundation
#if canImport(Glibc)
internal import Glibc
#endif

enum ByteSearch {
    /// The offset of the first occurrence of `needle` in `haystack`, if any.
    static func find(_ needle: [UInt8], in haystack: UnsafeRawBufferPointer) -> Int? {
        guard !needle.isEmpty, let base = haystack.baseAddress, haystack.count >= needle.count else { return nil }
        return needle.withUnsafeBytes { pattern in
            let first = Int32(needle[0])
            let lastStart = haystack.count - needle.count
            var offset = 0
            while offset <= lastStart {
                guard let hit = memchr(base + offset, first, lastStart - offset + 1) else { return nil }
                let position = base.distance(to: UnsafeRawPointer(hit))
                if memcmp(base + position, pattern.baseAddress!, pattern.count) == 0 { return position }
                offset = position + 1
            }
            return nil
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
