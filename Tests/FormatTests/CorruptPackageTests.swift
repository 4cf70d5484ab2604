import Foundation
import Testing
@testable import Format

/// One case per way a package can be wrong: each is rejected by the reader (structure) or by
/// verify (checksums, padding) with its own defect, never a crash.
@Suite struct CorruptPackageTests {
    struct Case: CustomTestStringConvertible, Sendable {
        let name: String
        let defect: PackageDefect
        /// True when only `verify()` (reading the data) can find it.
        let needsVerify: Bool
        var model = "tiny-4b-like"
        let damage: @Sendable (inout Data) throws -> Void
        var testDescription: String { name }
    }

    static func u64(_ data: Data, _ offset: Int) -> Int {
        data.subdata(in: offset..<offset + 8).withUnsafeBytes { Int(UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self))) }
    }

    /// Recomputes the header CRC after editing header fields.
    static func resealHeader(_ data: inout Data) {
        let crc = CRC32.checksum([UInt8](data.prefix(60)))
        data.replaceSubrange(60..<64, with: withUnsafeBytes(of: crc.littleEndian) { Data($0) })
    }

    static func setHeader<T: FixedWidthInteger>(_ data: inout Data, _ offset: Int, _ value: T) {
        data.replaceSubrange(offset..<offset + MemoryLayout<T>.size, with: withUnsafeBytes(of: value.littleEndian) { Data($0) })
        resealHeader(&data)
    }

    /// Edits the manifest as JSON and rewrites it with a valid CRC, so only the edit is wrong.
    static func editManifest(_ data: inout Data, _ edit: (inout [String: Any]) -> Void) throws {
        let length = u64(data, 24), dataOffset = u64(data, 32)
        var manifest = try JSONSerialization.jsonObject(with: data.subdata(in: 64..<64 + length)) as! [String: Any]
        edit(&manifest)
        try replaceManifest(&data, with: try JSONSerialization.data(withJSONObject: manifest), dataOffset: dataOffset)
    }

    static func replaceManifest(_ data: inout Data, with bytes: Data, dataOffset: Int) throws {
        precondition(64 + bytes.count <= dataOffset)
        data.replaceSubrange(64..<dataOffset, with: bytes + Data(count: dataOffset - 64 - bytes.count))
        setHeader(&data, 24, UInt64(bytes.count))
        setHeader(&data, 48, CRC32.checksum([UInt8](bytes)))
    }

    static func editTensor(_ data: inout Data, _ name: String, _ edit: @escaping (inout [String: Any]) -> Void) throws {
        try editManifest(&data) { manifest in
            var tensors = manifest["tensors"] as! [[String: Any]]
            let i = tensors.firstIndex { $0["name"] as? String == name }!
            edit(&tensors[i])
            manifest["tensors"] = tensors
        }
    }

    static func tensorOffset(_ data: Data, _ name: String) throws -> Int {
        let manifest = try JSONSerialization.jsonObject(with: data.subdata(in: 64..<64 + u64(data, 24))) as! [String: Any]
        return (manifest["tensors"] as! [[String: Any]]).first { $0["name"] as? String == name }!["offset"] as! Int
    }

    static let cases: [Case] = [
        Case(name: "shorter than a header", defect: .truncated, needsVerify: false) { data in data = data.prefix(40) },
        Case(name: "wrong magic", defect: .notAPackage, needsVerify: false) { data in data[0] = 0x47 },
        Case(name: "header checksum", defect: .headerChecksum, needsVerify: false) { data in data[33] ^= 1 },
        Case(name: "newer major version", defect: .unsupportedVersion, needsVerify: false) { data in
            setHeader(&data, 8, UInt16(PackageFormat.majorVersion + 1))
        },
        Case(name: "unknown flags", defect: .unsupportedVersion, needsVerify: false) { data in setHeader(&data, 12, UInt32(4)) },
        Case(name: "file truncated", defect: .truncated, needsVerify: false) { data in data = data.prefix(data.count - 4096) },
        Case(name: "manifest length past the data offset", defect: .rangeOutOfBounds, needsVerify: false) { data in
            setHeader(&data, 24, UInt64(1 << 40))
        },
        Case(name: "data offset not page aligned", defect: .rangeOutOfBounds, needsVerify: false) { data in
            setHeader(&data, 32, UInt64(u64(data, 32) + 64))
        },
        Case(name: "manifest byte changed", defect: .manifestChecksum, needsVerify: false) { data in data[100] ^= 0x20 },
        Case(name: "manifest is not JSON", defect: .invalidManifest, needsVerify: false) { data in
            try replaceManifest(&data, with: Data("{\"format\":\"stpk\",".utf8), dataOffset: u64(data, 32))
        },
        Case(name: "unknown dtype", defect: .invalidManifest, needsVerify: false) { data in
            try editTensor(&data, "layers.1.attn_q") { $0["dtype"] = "q3_k" }
        },
        Case(name: "row_major_x8 on a float tensor", defect: .invalidManifest, needsVerify: false) { data in
            try editTensor(&data, "layers.1.attn_q") { $0["layout"] = "row_major_x8" }
        },
        Case(name: "row_major_x8 in a format 1 file", defect: .invalidManifest, needsVerify: false) { data in
            setHeader(&data, 8, UInt16(1))
            try editTensor(&data, "layers.1.attn_q") { $0["layout"] = "row_major_x8" }
        },
        Case(name: "row_major_b8 on a float tensor", defect: .invalidManifest, needsVerify: false) { data in
            try editTensor(&data, "layers.1.experts.0.up") { $0["layout"] = "row_major_b8" }
        },
        Case(name: "row_major_b8 in a format 2 file", defect: .invalidManifest, needsVerify: false) { data in
            setHeader(&data, 8, UInt16(2))
            try editTensor(&data, "layers.1.experts.0.up") { $0["layout"] = "row_major_b8" }
        },
        Case(name: "length disagrees with shape", defect: .invalidManifest, needsVerify: false) { data in
            try editTensor(&data, "layers.1.attn_q") { $0["length"] = ($0["length"] as! Int) - 2 }
        },
        Case(name: "tensor past the end of the file", defect: .rangeOutOfBounds, needsVerify: false) { data in
            let end = (data.count / 64 + 1) * 64
            try editTensor(&data, "output_norm") { $0["offset"] = end }
        },
        Case(name: "tensor inside the manifest", defect: .rangeOutOfBounds, needsVerify: false) { data in
            try editTensor(&data, "output_norm") { $0["offset"] = 128 }
        },
        Case(name: "offset near Int.max", defect: .rangeOutOfBounds, needsVerify: false) { data in
            try editTensor(&data, "output_norm") { $0["offset"] = Int.max - 63 }
        },
        Case(name: "two tensors overlap", defect: .overlappingRanges, needsVerify: false) { data in
            let q = try tensorOffset(data, "layers.1.attn_q")
            try editTensor(&data, "layers.1.attn_k") { $0["offset"] = q + 64 }
        },
        Case(name: "misaligned tensor", defect: .misaligned, needsVerify: false) { data in
            try editTensor(&data, "output_norm") { $0["offset"] = ($0["offset"] as! Int) + 2 }
        },
        Case(name: "a required tensor is missing", defect: .invalidManifest, needsVerify: false) { data in
            try editManifest(&data) { m in
                m["tensors"] = (m["tensors"] as! [[String: Any]]).filter { $0["name"] as? String != "layers.2.ffn_norm" }
            }
        },
        Case(name: "wrong shape for the config", defect: .invalidManifest, needsVerify: false) { data in
            try editTensor(&data, "layers.0.router") { $0["shape"] = [64, 8];  }
        },
        Case(name: "bundles out of order", defect: .invalidManifest, needsVerify: false) { data in
            try editManifest(&data) { m in
                var bundles = m["expert_bundles"] as! [[String: Any]]
                bundles.swapAt(3, 4)
                m["expert_bundles"] = bundles
            }
        },
        Case(name: "bundle not page aligned", defect: .misaligned, needsVerify: false) { data in
            try editManifest(&data) { m in
                var bundles = m["expert_bundles"] as! [[String: Any]]
                bundles[5]["offset"] = (bundles[5]["offset"] as! Int) + 64
                m["expert_bundles"] = bundles
            }
        },
        Case(name: "bundle names another expert's tensors", defect: .invalidManifest, needsVerify: false) { data in
            try editManifest(&data) { m in
                var bundles = m["expert_bundles"] as! [[String: Any]]
                bundles[5]["tensors"] = bundles[6]["tensors"]
                m["expert_bundles"] = bundles
            }
        },
        Case(name: "tensor data changed", defect: .tensorChecksum, needsVerify: true) { data in
            data[try tensorOffset(data, "layers.3.attn_v") + 7] ^= 0x01
        },
        Case(name: "expert data changed", defect: .tensorChecksum, needsVerify: true) { data in
            data[try tensorOffset(data, "layers.0.experts.2.down") + 100] ^= 0x80
        },
        Case(name: "bundle checksum wrong", defect: .bundleChecksum, needsVerify: true) { data in
            try editManifest(&data) { m in
                var bundles = m["expert_bundles"] as! [[String: Any]]
                bundles[9]["crc32"] = "00000000"
                m["expert_bundles"] = bundles
            }
        },
        // tiny-21b-like: a bundle is 3 × 9216 bytes, padded with 1024 zero bytes to 7 pages.
        Case(name: "padding after a bundle is not zero", defect: .nonZeroPadding, needsVerify: true, model: "tiny-21b-like") { data in
            let manifest = try JSONSerialization.jsonObject(with: data.subdata(in: 64..<64 + u64(data, 24))) as! [String: Any]
            let bundle = (manifest["expert_bundles"] as! [[String: Any]])[0]
            data[(bundle["offset"] as! Int) + (bundle["length"] as! Int) - 1] = 1
        },
        Case(name: "padding after the manifest is not zero", defect: .nonZeroPadding, needsVerify: true) { data in
            data[u64(data, 32) - 1] = 0xFF
        }
    ]

    /// Format 3 readers still read format 1 files (2.0 and 3.0 only added layouts).
    @Test func formatOneFilesStillOpen() throws {
        let scratch = ScratchDirectory()
        let path = try convertFixture("tiny-4b-like", in: scratch)
        var data = try Data(contentsOf: URL(fileURLWithPath: path))
        Self.setHeader(&data, 8, UInt16(1))
        try data.write(to: URL(fileURLWithPath: path))
        let reader = try PackageReader(path: path)
        #expect(reader.header.majorVersion == 1)
        try reader.verify()
    }

    @Test(arguments: cases)
    func corruptPackageIsRejectedWithItsOwnDefect(_ c: Case) throws {
        let scratch = ScratchDirectory()
        let path = try convertFixture(c.model, in: scratch)
        var data = try Data(contentsOf: URL(fileURLWithPath: path))
        try c.damage(&data)
        try data.write(to: URL(fileURLWithPath: path))
        var caught: FormatError?
        var openedFine = false
        do {
            let reader = try PackageReader(path: path)
            openedFine = true
            try reader.verify()
        } catch {
            caught = error
        }
        let error = try #require(caught, "\(c.name) was accepted")
        #expect(error.packageDefect == c.defect, "\(error)")
        #expect(openedFine == c.needsVerify, "found by \(openedFine ? "verify" : "open"): \(error)")
    }

    @Test func intactPackageVerifiesAndReportsProgress() throws {
        let scratch = ScratchDirectory()
        let reader = try PackageReader(path: try convertFixture("tiny-21b-like", in: scratch))
        var last = (0, 0)
        try reader.verify { last = ($0, $1) }
        #expect(last.0 == reader.header.fileLength && last.1 == reader.header.fileLength)
    }
}
