import Foundation
import Testing
@testable import Format

/// Q4_0 with an importance matrix against llama.cpp's own quantiser: ggml-quants.c from the
/// pinned llama-cpp-python sdist (`.ci/setup` fetches it into .build/llama.cpp, as
/// Benchmarks/llama_cpp.sh does), compiled in whole into a small helper
/// (Tests/Fixtures/quant/ggml_quantize.c) without fused multiply-adds.
@Suite struct ImportanceQuantizationTests {
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    /// The helper, built once per run.
    static let helper: Result<String, HelperError> = {
        let source = ProcessInfo.processInfo.environment["LLAMA_CPP_DIR"] ?? packageRoot + "/.build/llama.cpp"
        guard FileManager.default.fileExists(atPath: source + "/ggml/src/ggml-quants.c") else {
            return .failure(HelperError(message: "no llama.cpp source at \(source): run bash .ci/setup (or set LLAMA_CPP_DIR)"))
        }
        let binary = NSTemporaryDirectory() + "ggml_quantize-" + UUID().uuidString
        let ggml = source + "/ggml"
        let result = run(
            "/usr/bin/env",
            [
                "clang", "-O2", "-ffp-contract=off", "-w", "-I", ggml + "/include", "-I", ggml + "/src", "-I", ggml + "/src/ggml-cpu",
                Fixtures.root + "/quant/ggml_quantize.c", "-o", binary, "-lm"
            ])
        return result.status == 0 ? .success(binary) : .failure(HelperError(message: "building the helper failed: \(result.output)"))
    }()

    struct HelperError: Error { let message: String }

    static func run(_ tool: String, _ arguments: [String]) -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        do { try process.run() } catch { return (-1, "\(error)") }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// llama.cpp's blocks for `x` (rows of `length`), weighted by `importance` or not.
    static func theirs(_ x: [Float], rows: Int, length: Int, importance: [Float]?) throws -> [UInt8] {
        let helper = try helper.get()
        let scratch = ScratchDirectory()
        var input = Data()
        for v in [Int64(rows), Int64(length), importance == nil ? 0 : 1] {
            withUnsafeBytes(of: v.littleEndian) { input.append(contentsOf: $0) }
        }
        x.withUnsafeBytes { input.append(contentsOf: $0) }
        importance?.withUnsafeBytes { input.append(contentsOf: $0) }
        try input.write(to: URL(fileURLWithPath: scratch.file("in")))
        let result = run(helper, [scratch.file("in"), scratch.file("out")])
        guard result.status == 0 else { throw HelperError(message: "ggml_quantize exited \(result.status): \(result.output)") }
        return Array(try Data(contentsOf: URL(fileURLWithPath: scratch.file("out"))))
    }

    struct Generator {
        var state: UInt64
        mutating func next() -> Float {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return Float(state >> 40) / Float(1 << 24)
        }
        /// Roughly normal: the sum of four uniforms, centred.
        mutating func normal() -> Float { (next() + next() + next() + next() - 2) * 1.7 }
    }

    /// The bytes are llama.cpp's, block for block, over matrices shaped like the model's (rows of
    /// 32 to 4096 values) with outlier weights, all-zero blocks and blocks of one value, and
    /// importances spread over six decades with some columns of zero importance.
    @Test func weightedBlocksAreLlamaCppsBitForBit() throws {
        var g = Generator(state: 42)
        for (rows, length) in [(3, 32), (16, 256), (7, 1536), (5, 4096), (64, 128)] {
            var x = (0..<rows * length).map { _ in g.normal() * 0.02 }
            for i in stride(from: 17, to: x.count, by: 97) { x[i] *= 40 }  // outliers
            for i in 0..<min(32, x.count) { x[i] = 0 }  // an all-zero block
            if x.count >= 64 { for i in 32..<64 { x[i] = 0.5 } }  // a block of one value
            var importance = (0..<length).map { _ in Float(pow(10.0, Double(g.next() * 6 - 4))) }
            for i in stride(from: 5, to: length, by: 11) { importance[i] = 0 }
            var ours = [UInt8](repeating: 0, count: rows * length / 32 * 18)
            x.withUnsafeBufferPointer { xs in
                importance.withUnsafeBufferPointer { w in
                    ours.withUnsafeMutableBytes {
                        Q4_0.quantize(xs.baseAddress!, rows: rows, rowLength: length, importance: w.baseAddress!, into: $0.baseAddress!)
                    }
                }
            }
            let expected = try Self.theirs(x, rows: rows, length: length, importance: importance)
            let differing = (0..<ours.count / 18).filter { ours[$0 * 18..<$0 * 18 + 18] != expected[$0 * 18..<$0 * 18 + 18] }
            #expect(
                differing.isEmpty,
                "\(rows)×\(length): \(differing.count) of \(ours.count / 18) blocks differ, first \(differing.first ?? -1)")
            // Unweighted, llama.cpp's is the reference quantiser, ours already (QuantizationTests).
            var plain = [UInt8](repeating: 0, count: ours.count)
            x.withUnsafeBufferPointer { xs in
                plain.withUnsafeMutableBytes { Q4_0.quantize(xs.baseAddress!, count: x.count, into: $0.baseAddress!) }
            }
            #expect(plain == (try Self.theirs(x, rows: rows, length: length, importance: nil)), "\(rows)×\(length) unweighted")
            #expect(plain != ours, "\(rows)×\(length): the importance changes some blocks")
        }
    }
}
