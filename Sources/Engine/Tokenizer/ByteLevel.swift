/// GPT-2's byte-level alphabet: every byte maps to one printable Unicode scalar, so any byte
/// string is a string of "characters" BPE can merge. Printable Latin-1 bytes map to themselves;
/// the other 68 (controls, space, 0x7F–0xA0, 0xAD) map to U+0100 onwards in byte order.
enum ByteLevel {
    static let byteToScalar: [Unicode.Scalar] = {
        var table = [Unicode.Scalar](repeating: " ", count: 256)
        var next: UInt32 = 256
        for byte in 0..<256 {
            let printable = (0x21...0x7E).contains(byte) || (0xA1...0xAC).contains(byte) || (0xAE...0xFF).contains(byte)
            if printable {
                table[byte] = Unicode.Scalar(UInt32(byte))!
            } else {
                table[byte] = Unicode.Scalar(next)!
                next += 1
            }
        }
        return table
    }()

    static let scalarToByte: [UInt32: UInt8] = {
        var map: [UInt32: UInt8] = [:]
        for (byte, scalar) in byteToScalar.enumerated() { map[scalar.value] = UInt8(byte) }
        return map
    }()

    /// The byte-level string of some UTF-8 bytes.
    static func encode(_ bytes: some Sequence<UInt8>) -> String {
        var out = String.UnicodeScalarView()
        for byte in bytes { out.append(byteToScalar[Int(byte)]) }
        return String(out)
    }

    /// The bytes a byte-level string stands for; nil if it has a scalar outside the alphabet.
    static func decode(_ text: String) -> [UInt8]? {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(text.unicodeScalars.count)
        for scalar in text.unicodeScalars {
            guard let byte = scalarToByte[scalar.value] else { return nil }
            bytes.append(byte)
        }
        return bytes
    }
}
