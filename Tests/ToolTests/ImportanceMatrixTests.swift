import Foundation
import Format
import Testing

/// Importance matrices in llama.cpp's GGUF layout, checked with the gguf package (llama.cpp's
/// own Python reader and writer), and `stquant --imatrix` as a user runs it.
@Suite struct ImportanceMatrixTests {
    static let trained = URL(fileURLWithPath: Tools.fixtures).deletingLastPathComponent().appendingPathComponent("trained").path

    static func python(_ script: String, _ arguments: [String]) throws -> Tools.Result {
        try Tools.run("/usr/bin/env", ["python3", "-c", script] + arguments)
    }

    /// Ours read by the gguf package: general.type, the metadata, and per entry `NAME.in_sum2`
    /// [columns, matrices] and `NAME.counts` [1, matrices] in f32 with our values; and a file the
    /// gguf package writes in llama-imatrix's layout read by ours.
    @Test func theFileIsLlamaImatrixs() throws {
        let scratch = ToolScratch()
        var matrix = ImportanceMatrix(datasets: ["calibration.txt"], chunkCount: 3, chunkSize: 512)
        var stacked = ImportanceMatrix.Entry(columns: 64, matrices: 4)
        for i in stacked.sums.indices { stacked.sums[i] = Float(i % 97) * 0.25 }
        stacked.counts = [10, 0, 3, 7]
        var dense = ImportanceMatrix.Entry(columns: 32, matrices: 1)
        for i in dense.sums.indices { dense.sums[i] = Float(i) + 0.5 }
        dense.counts = [1536]
        matrix.entries = ["blk.0.ffn_up_exps.weight": stacked, "blk.0.attn_q.weight": dense]
        let path = scratch.file("ours.gguf")
        try matrix.write(to: path, overwrite: false)
        let check = """
            import sys, gguf, numpy as np
            r = gguf.GGUFReader(sys.argv[1])
            assert r.get_field("general.type").contents() == "imatrix"
            assert r.get_field("imatrix.datasets").contents() == ["calibration.txt"]
            assert r.get_field("imatrix.chunk_count").contents() == 3 and r.get_field("imatrix.chunk_size").contents() == 512
            t = {x.name: x for x in r.tensors}
            s, c = t["blk.0.ffn_up_exps.weight.in_sum2"], t["blk.0.ffn_up_exps.weight.counts"]
            assert s.tensor_type == gguf.GGMLQuantizationType.F32 and list(s.shape) == [64, 4], s.shape
            assert list(c.shape) == [1, 4] and list(c.data.reshape(-1)) == [10, 0, 3, 7]
            assert np.array_equal(s.data.reshape(-1), (np.arange(256) % 97).astype(np.float32) * 0.25)
            assert list(t["blk.0.attn_q.weight.in_sum2"].shape) == [32, 1]
            w = gguf.GGUFWriter(sys.argv[2], arch="")
            w.add_string("general.type", "imatrix")
            w.add_array("imatrix.datasets", ["other.txt"])
            w.add_uint32("imatrix.chunk_count", 9)
            w.add_uint32("imatrix.chunk_size", 256)
            w.add_tensor("blk.1.ffn_down_exps.weight.in_sum2", np.arange(48, dtype=np.float32).reshape(3, 16))
            w.add_tensor("blk.1.ffn_down_exps.weight.counts", np.array([[2], [0], [4]], dtype=np.float32))
            w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
            """
        let result = try Self.python(check, [path, scratch.file("theirs.gguf")])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(try ImportanceMatrix(path: path) == matrix)
        let theirs = try ImportanceMatrix(path: scratch.file("theirs.gguf"))
        #expect(theirs.datasets == ["other.txt"] && theirs.chunkCount == 9 && theirs.chunkSize == 256)
        let e = try #require(theirs.entries["blk.1.ffn_down_exps.weight"])
        #expect(e.columns == 16 && e.matrices == 3)
        #expect(e.importance(matrix: 0) == (0..<16).map { Float($0) / 2 })
        #expect(e.importance(matrix: 1) == [Float](repeating: 1, count: 16), "no tokens: importance 1, as llama-quantize")
        #expect(e.importance(matrix: 2) == (32..<48).map { Float($0) / 4 })
    }

    /// `stquant --imatrix`: the weighted tensors' blocks are what the weighted quantiser (held to
    /// llama.cpp's) gives for their importances, the package verifies and runs; a matrix made
    /// for another model, and a file that is not one, are clear errors with nothing written.
    @Test func stquantWeighsTheBlocks() throws {
        let scratch = ToolScratch()
        let float = scratch.file("f32.stpk")
        #expect(try Tools.run("stconvert", [Self.trained + "/trained-21b-like", "-o", float, "--dtype", "f32", "-q"]).status == 0)
        let reader = try PackageReader(path: float)
        let config = reader.manifest.config
        // Importances for every input of every layer: a smooth ramp over the columns, so that
        // every weighted block is checkable.
        var matrix = ImportanceMatrix(datasets: ["synthetic"], chunkCount: 1, chunkSize: 64)
        for t in reader.manifest.tensors {
            guard let (name, _) = ImportanceMatrix.source(of: t.name), matrix.entries[name] == nil else { continue }
            let down = name.contains("ffn_down")
            let columns = down ? config.expertFFNSize : t.shape[1]
            let matrices = name.contains("_exps") ? config.expertCount : 1
            var e = ImportanceMatrix.Entry(columns: columns, matrices: matrices)
            for m in 0..<matrices {
                e.counts[m] = 64
                for c in 0..<columns { e.sums[m * columns + c] = 64 * Float(1 + (c * 7 + m) % 23) }
            }
            matrix.entries[name] = e
        }
        let imatrix = scratch.file("imatrix.gguf"), weighted = scratch.file("weighted.stpk"), plain = scratch.file("plain.stpk")
        try matrix.write(to: imatrix, overwrite: false)
        var result = try Tools.run("stquant", [float, "-o", weighted, "--type", "q4_0", "--imatrix", imatrix])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stderr.contains("tensors weighted"), "\(result.stderr)")
        #expect(try Tools.run("stquant", [float, "-o", plain, "--type", "q4_0", "-q"]).status == 0)
        #expect(try Tools.run("strun", ["verify", weighted]).status == 0)
        let w = try PackageReader(path: weighted), p = try PackageReader(path: plain)
        let query = TensorNames.query(1), gate = TensorNames.expertGate(2, 5)
        for name in [query, gate] {
            let t = try #require(reader.manifest.tensors.first { $0.name == name })
            let (source, index) = try #require(ImportanceMatrix.source(of: name))
            let importance = matrix.entries[source]!.importance(matrix: index)
            let values = try reader.floats(name)
            var expected = [UInt8](repeating: 0, count: values.count / 32 * 18)
            values.withUnsafeBufferPointer { v in
                importance.withUnsafeBufferPointer { i in
                    expected.withUnsafeMutableBytes {
                        Q4_0.quantize(
                            v.baseAddress!, rows: t.shape[0], rowLength: t.shape[1], importance: i.baseAddress!, into: $0.baseAddress!)
                    }
                }
            }
            #expect(try w.plainBlocks(name) == expected, "\(name): the weighted blocks")
            #expect(try p.plainBlocks(name) != expected, "\(name): the plain blocks differ")
        }
        let generated = try Tools.run("strun", ["generate", weighted, "-p", "And it came to pass", "-n", "8", "--seed", "1"])
        #expect(generated.status == 0 && generated.stdout.count > 8, "\(generated.stderr)")

        // Another model's: the query projection's inputs are 128 wide there.
        var other = matrix
        other.entries[ImportanceMatrix.source(of: query)!.name] = ImportanceMatrix.Entry(columns: 128, matrices: 1)
        let wrong = scratch.file("wrong.gguf"), out = scratch.file("out.stpk")
        try other.write(to: wrong, overwrite: false)
        result = try Tools.run("stquant", [float, "-o", out, "--type", "q4_0", "--imatrix", wrong])
        #expect(result.status != 0 && result.stderr.contains("another model") && result.stderr.contains("128"), "\(result.stderr)")
        result = try Tools.run("stquant", [float, "-o", out, "--type", "q4_0", "--imatrix", float])
        #expect(result.status != 0 && !result.stderr.isEmpty, "\(result.stderr)")
        #expect(!FileManager.default.fileExists(atPath: out))
    }
}

extension ImportanceMatrixTests {
    /// `strun imatrix` as a user runs it on the trained fixture: over the calibration sample
    /// (training chapters, 7,652 tokens in chunks of 512) it writes every matrix's entry with
    /// progress, token counts the tokens (k per token over a layer's experts), and Q4_0 with it
    /// loses less over the held-out sample than plain Q4_0 (measured: mean KL 0.0335 against
    /// 0.0402; most of the gain is the tied embedding, weighted as the output matrix it also is),
    /// and with `stquant --router-aware` less than 0.7x (0.0231);
    /// streaming the experts under a memory budget collects the same file; `--in-file` adds to an
    /// earlier file; bad requests are clear errors that write nothing.
    @Test func strunImatrixCollectsAndQuantisingWithItLosesLess() throws {
        let scratch = ToolScratch()
        let float = scratch.file("f32.stpk"), calibration = Self.trained + "/calibration-sample.txt"
        #expect(try Tools.run("stconvert", [Self.trained + "/trained-21b-like", "-o", float, "--dtype", "f32", "-q"]).status == 0)
        let config = try PackageReader(path: float).manifest.config
        let path = scratch.file("ours.gguf")
        var result = try Tools.run("strun", ["imatrix", float, "--file", calibration, "-o", path, "-t", "2"])
        #expect(result.status == 0 && result.stderr.contains("chunk 15/15, 7652/7652 tokens"), "\(result.stderr)")
        #expect(result.stdout.contains("57 matrices, 7652 tokens in 15 chunks of 512"), "\(result.stdout)")
        let matrix = try ImportanceMatrix(path: path)
        #expect(matrix.entries.count == 7 * config.layerCount + 1 && matrix.chunkCount == 15 && matrix.chunkSize == 512)
        #expect(matrix.datasets == [calibration])
        for l in 0..<config.layerCount {
            #expect(matrix.entries["blk.\(l).attn_q.weight"]?.counts == [7652])
            #expect(matrix.entries["blk.\(l).attn_output.weight"]?.columns == config.queryWidth)
            let down = try #require(matrix.entries["blk.\(l).ffn_down_exps.weight"])
            #expect(down.columns == config.expertFFNSize && down.matrices == config.expertCount)
            #expect(down.counts.reduce(0, +) == Float(7652 * config.activeExperts))
        }
        #expect(matrix.entries["token_embd.weight"]?.counts == [7652], "the tied embedding, as the output matrix")

        let plain = scratch.file("plain.stpk"), weighted = scratch.file("weighted.stpk")
        #expect(try Tools.run("stquant", [float, "-o", plain, "--type", "q4_0", "-q"]).status == 0)
        #expect(try Tools.run("stquant", [float, "-o", weighted, "--type", "q4_0", "--imatrix", path, "-q"]).status == 0)
        func meanKL(_ package: String) throws -> Double {
            let r = try Tools.run("strun", ["compare", float, package, "--file", Self.trained + "/held-out-sample.txt", "--json"])
            let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
            return try #require(json?["mean_kl"] as? Double, "\(r.stderr)")
        }
        let (a, b) = (try meanKL(plain), try meanKL(weighted))
        #expect(b < 0.036 && b < 0.9 * a, "mean KL with the importance matrix \(b), plain \(a)")
        // --router-aware: the embedding's blocks with error feedback against the routers (measured 0.0231, 0.57x plain).
        let aware = scratch.file("aware.stpk")
        result = try Tools.run("stquant", [float, "-o", aware, "--type", "q4_0", "--imatrix", path, "--router-aware"])
        #expect(result.status == 0 && result.stderr.contains("router-aware: token_embd"), "\(result.stderr)")
        #expect(try Tools.run("strun", ["verify", aware]).status == 0)
        let c = try meanKL(aware)
        #expect(c < 0.026 && c < 0.7 * a, "mean KL with the importance matrix and --router-aware \(c), plain \(a)")
        result = try Tools.run(
            "stquant", [float, "-o", scratch.file("no.stpk"), "--type", "q4_0", "--embedding-type", "q8_0", "--router-aware"])
        #expect(result.status != 0 && result.stderr.contains("--embedding-type q4_0"), "\(result.stderr)")
        #expect(!FileManager.default.fileExists(atPath: scratch.file("no.stpk")))

        // --chunks: the first chunks only.
        let two = scratch.file("two.gguf")
        result = try Tools.run("strun", ["imatrix", float, "--file", calibration, "--chunk", "100", "--chunks", "2", "-o", two, "-q"])
        #expect(result.status == 0 && result.stdout.contains("200 tokens in 2 chunks of 100"), "\(result.stdout)\(result.stderr)")

        // Streaming the experts under the smallest budget the Q4_0 package accepts collects the same file, byte for byte.
        let held = Self.trained + "/held-out-sample.txt", mapped = scratch.file("mapped.gguf"), streamed = scratch.file("streamed.gguf")
        #expect(try Tools.run("strun", ["imatrix", plain, "--file", held, "-o", mapped, "-q", "-t", "2"]).status == 0)
        result = try Tools.run("strun", ["imatrix", plain, "--file", held, "-o", streamed, "-q", "-t", "2", "--memory-budget", "70.2MiB"])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(FileManager.default.contents(atPath: mapped) == FileManager.default.contents(atPath: streamed))

        // --in-file: this text's sums added to the earlier file's.
        let merged = scratch.file("merged.gguf")
        result = try Tools.run("strun", ["imatrix", float, "--text", "In the beginning", "--in-file", path, "-o", merged, "-q"])
        #expect(result.status == 0, "\(result.stderr)")
        let sum = try ImportanceMatrix(path: merged)
        let added = try #require(sum.entries["blk.0.attn_q.weight"]?.counts.first) - 7652
        #expect(added >= 2 && added <= 5 && sum.chunkCount == 16, "\(added) tokens added")

        // Errors, with nothing written.
        var other = matrix
        other.entries["blk.0.attn_q.weight"] = ImportanceMatrix.Entry(columns: 128, matrices: 1)
        let wrong = scratch.file("wrong.gguf"), out = scratch.file("out.gguf")
        try other.write(to: wrong, overwrite: false)
        for (arguments, message) in [
            (["--text", "And", "--in-file", wrong], "another model"), (["--text", "And", "--chunk", "0"], "--chunk"),
            (["--text", ""], "no tokens"), (["--file", scratch.file("missing.txt")], "missing.txt"),
            (["--text", "And", "--chunk", "64", "--context", "32"], "--context"), (["--text", "And", "--chunks", "0"], "--chunks")
        ] {
            result = try Tools.run("strun", ["imatrix", float, "-o", out] + arguments)
            #expect(result.status != 0 && result.stderr.contains(message), "\(arguments): \(result.stderr)")
            #expect(!FileManager.default.fileExists(atPath: out))
        }
        result = try Tools.run("strun", ["imatrix", float, "--text", "And", "-o", path, "-q"])
        #expect(result.status != 0 && result.stderr.contains("exists"), "\(result.stderr)")
    }
}

extension PackageReader {
    /// A tensor's values as float32.
    fileprivate func floats(_ name: String) throws -> [Float] {
        let t = try #require(tensor(name))
        var values = [Float](repeating: 0, count: t.elementCount)
        values.withUnsafeMutableBufferPointer { decode(t, into: $0.baseAddress!) }
        return values
    }

    /// A quantised tensor's blocks in plain row order, however its rows are grouped.
    fileprivate func plainBlocks(_ name: String) throws -> [UInt8] {
        let t = try #require(tensor(name))
        var plain = [UInt8](repeating: 0, count: t.length)
        plain.withUnsafeMutableBytes {
            t.layout.plainRows(bytes(of: t).baseAddress!, into: $0.baseAddress!, rowBytes: t.length / t.rows, rowCount: t.rows)
        }
        return plain
    }
}
