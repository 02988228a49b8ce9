// JSON text for Foundation JSON values, several times faster than JSONSerialization's writer.
internal import Foundation

/// Writes the values `JSONSerialization` reads (`[String: Any]`, `[Any]`, `String`, `NSNumber`,
/// `NSNull`) and the Swift values the gateway builds its answers from (`Int`, `Double`, `Bool`)
/// as compact JSON text, slashes unescaped.
///
/// Why not `JSONSerialization.data(withJSONObject:)`: on Linux it bridges every dictionary to
/// `NSDictionary` and casts every value dynamically, which made it a quarter of the CPU of an
/// Ollama request on the router path (and more for streams, one chunk per token). This writer
/// dispatches on the value's exact type first, so common values cost no bridging.
enum JSONText {
    /// `object` as JSON text.
    static func data(_ object: Any) -> Data {
        var output: [UInt8] = []
        output.reserveCapacity(256)
        append(object, to: &output)
        return Data(output)
    }

    /// Appends `value` as JSON text. A number JSON cannot spell (NaN, infinity) is written as
    /// `null`; a value of a type JSON has no form for, as its description in a string.
    static func append(_ value: Any, to output: inout [UInt8]) {
        // Exact-type checks first: a conditional cast of a Swift value to a class (or of an
        // NSNumber to a Swift number) goes through Foundation's bridging, which is the cost avoided.
        let type = ObjectIdentifier(Swift.type(of: value))
        if type == stringType {
            appendString(value as! String, to: &output)
        } else if type == objectType {
            appendObject(value as! [String: Any], to: &output)
        } else if type == arrayType {
            appendArray(value as! [Any], to: &output)
        } else if type == intType {
            appendInteger(value as! Int, to: &output)
        } else if type == boolType {
            output.append(contentsOf: (value as! Bool) ? trueText : falseText)
        } else if type == doubleType {
            appendDouble(value as! Double, to: &output)
        } else if Swift.type(of: value) is AnyObject.Type {
            // Foundation's classes: these casts are class-hierarchy checks, no bridging.
            if let number = value as? NSNumber {
                appendNumber(number, to: &output)
            } else if value is NSNull {
                output.append(contentsOf: nullText)
            } else if let text = value as? NSString {
                appendString(text as String, to: &output)
            } else if let object = value as? NSDictionary {
                appendObject(object as? [String: Any] ?? [:], to: &output)
            } else if let array = value as? NSArray {
                appendArray(Array(array), to: &output)
            } else {
                appendString(String(describing: value), to: &output)
            }
        } else if let array = value as? [Any] {
            // Swift collections of a narrower type (`[[String: Any]]`, `[String]`, `[Int]`).
            appendArray(array, to: &output)
        } else if let object = value as? [String: Any] {
            appendObject(object, to: &output)
        } else if let text = value as? String {
            appendString(text, to: &output)
        } else if let integer = value as? any BinaryInteger {
            appendInteger(integer, to: &output)
        } else if let number = value as? any BinaryFloatingPoint {
            appendDouble(Double(number), to: &output)
        } else if case let mirror = Mirror(reflecting: value), mirror.displayStyle == .optional {
            // An optional put in a dictionary as it was: its value, or null.
            if let wrapped = mirror.children.first?.value { append(wrapped, to: &output) } else { output.append(contentsOf: nullText) }
        } else {
            appendString(String(describing: value), to: &output)
        }
    }

    private static let stringType = ObjectIdentifier(String.self)
    private static let objectType = ObjectIdentifier([String: Any].self)
    private static let arrayType = ObjectIdentifier([Any].self)
    private static let intType = ObjectIdentifier(Int.self)
    private static let boolType = ObjectIdentifier(Bool.self)
    private static let doubleType = ObjectIdentifier(Double.self)
    private static let trueText = Array("true".utf8)
    private static let falseText = Array("false".utf8)
    private static let nullText = Array("null".utf8)

    private static func appendObject(_ object: [String: Any], to output: inout [UInt8]) {
        output.append(UInt8(ascii: "{"))
        var first = true
        for (key, member) in object {
            if !first { output.append(UInt8(ascii: ",")) }
            first = false
            appendString(key, to: &output)
            output.append(UInt8(ascii: ":"))
            append(member, to: &output)
        }
        output.append(UInt8(ascii: "}"))
    }

    private static func appendArray(_ array: [Any], to output: inout [UInt8]) {
        output.append(UInt8(ascii: "["))
        for (index, element) in array.enumerated() {
            if index > 0 { output.append(UInt8(ascii: ",")) }
            append(element, to: &output)
        }
        output.append(UInt8(ascii: "]"))
    }

    private static func appendInteger<Integer: BinaryInteger>(_ value: Integer, to output: inout [UInt8]) {
        output.append(contentsOf: String(value).utf8)
    }

    /// Swift's shortest form that reads back as the same double (`0.7`, `1e-05`): valid JSON.
    private static func appendDouble(_ value: Double, to output: inout [UInt8]) {
        guard value.isFinite else {
            output.append(contentsOf: nullText)
            return
        }
        output.append(contentsOf: value.description.utf8)
    }

    /// A JSON number or boolean as `JSONSerialization` decoded it (booleans are NSNumbers whose
    /// type is `c`), or one built in Swift.
    private static func appendNumber(_ number: NSNumber, to output: inout [UInt8]) {
        switch UInt8(bitPattern: number.objCType.pointee) {
        case UInt8(ascii: "c"), UInt8(ascii: "B"): output.append(contentsOf: number.boolValue ? trueText : falseText)
        case UInt8(ascii: "d"), UInt8(ascii: "f"): appendDouble(number.doubleValue, to: &output)
        case UInt8(ascii: "Q"), UInt8(ascii: "L"), UInt8(ascii: "I"), UInt8(ascii: "S"), UInt8(ascii: "C"): appendInteger(number.uint64Value, to: &output)
        default: appendInteger(number.int64Value, to: &output)
        }
    }

    private static let hexDigits = Array("0123456789abcdef".utf8)

    /// A string with `"`, `\` and control characters escaped; everything else, non-ASCII
    /// included, copied as its UTF-8 in runs.
    private static func appendString(_ text: String, to output: inout [UInt8]) {
        output.append(UInt8(ascii: "\""))
        var text = text
        text.withUTF8 { bytes in
            var runStart = 0
            for index in 0..<bytes.count {
                let byte = bytes[index]
                guard byte < 0x20 || byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") else { continue }
                output.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[runStart..<index]))
                runStart = index + 1
                output.append(UInt8(ascii: "\\"))
                switch byte {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"): output.append(byte)
                case 0x0a: output.append(UInt8(ascii: "n"))
                case 0x0d: output.append(UInt8(ascii: "r"))
                case 0x09: output.append(UInt8(ascii: "t"))
                case 0x08: output.append(UInt8(ascii: "b"))
                case 0x0c: output.append(UInt8(ascii: "f"))
                default: output.append(contentsOf: [UInt8(ascii: "u"), UInt8(ascii: "0"), UInt8(ascii: "0"), hexDigits[Int(byte >> 4)], hexDigits[Int(byte & 0xF)]])
                }
            }
            output.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[runStart...]))
        }
        output.append(UInt8(ascii: "\""))
    }
}
