import Foundation
import Format
import Testing

/// strun logits / generate / compare, run as built binaries against the fixtures' reference.
@Suite struct RunCommandTests {
    struct Sequence {
        let inputIDs: [Int]
        let greedy: [Int]
        let logits: [Float]  // [T, vocab]
    }

    static func reference(_ model: String, _ sequence: String = "short") throws -> Sequence {
        let data = try Data(contentsOf: URL(fileURLWithPath: Tools.fixtures + "/\(model)/reference.json"))
        let json = try JSONSerialization.jsonObject(with: data) as! [String: Any]
        let s = (json["sequences"] as! [String: [String: Any]])[sequence]!
        let logits = Data(base64Encoded: (s["logits"] as! [String: Any])["b64"] as! String)!
        return Sequence(
            inputIDs: s["input_ids"] as! [Int], greedy: s["greedy_tokens"] as! [Int],
            logits: logits.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) })
    }

    func package(_ scratch: ToolScratch, _ model: String, _ extra: [String] = []) throws -> String {
        let path = scratch.file("\(model).stpk")
        let result = try Tools.run("stconvert", [Tools.fixtures + "/" + model, "-o", path, "-q"] + extra)
        #expect(result.status == 0, "\(result.stderr)")
        return path
    }

    @Test func logitsFileMatchesTheReference() throws {
        let scratch = ToolScratch()
        let path = try package(scratch, "tiny-untied", ["--dtype", "f32"])
        let reference = try Self.reference("tiny-untied")
        func logits(_ extra: [String]) throws -> [Float] {
            let output = scratch.file("logits\(extra.joined()).f32")
            let tokens = reference.inputIDs.map(String.init).joined(separator: ",")
            let result = try Tools.run("strun", ["logits", path, "--tokens", tokens, "--output", output] + extra)
            #expect(result.status == 0, "\(result.stderr)")
            return try Data(contentsOf: URL(fileURLWithPath: output)).withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        }
        // An f32 cache computes what the authors' code does; the default f16 cache rounds each key
        // and value to 11 significant bits, which moves these logits (between -8.4 and 9.2) by a
        // few hundredths at most.
        let exact = try logits(["--kv-type", "f32"])
        #expect(exact.count == reference.inputIDs.count * 512)
        #expect(zip(exact, reference.logits).map { abs($0 - $1) }.max()! < 1e-3)
        let halves = try logits([])
        #expect(halves.count == reference.inputIDs.count * 512)
        let moved = zip(halves, reference.logits).map { abs($0 - $1) }.max()!
        #expect(moved > 0 && moved < 0.1, "the f16 cache moved the logits by \(moved)")
    }

    @Test(arguments: ["tiny-4b-like", "tiny-21b-like"])
    func greedyGenerationPrintsTheReferenceContinuation(model: String) throws {
        let scratch = ToolScratch()
        let path = try package(scratch, model)
        let reference = try Self.reference(model, "long")
        let result = try Tools.run(
            "strun",
            [
                "generate", path, "--tokens", reference.inputIDs.map(String.init).joined(separator: ","),
                "-n", "16", "--temperature", "0", "--ids"
            ])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout == reference.greedy.map(String.init).joined(separator: " ") + "\n")
    }

    @Test func seededSamplingIsReproducible() throws {
        let scratch = ToolScratch()
        let path = try package(scratch, "tiny-4b-like")
        let args = ["generate", path, "--tokens", "5,6,7", "-n", "12", "--temperature", "1.0", "--seed", "42", "--ids"]
        let first = try Tools.run("strun", args), second = try Tools.run("strun", args)
        #expect(first.status == 0 && first.stdout == second.stdout)
        #expect(first.stdout.split(separator: " ").count == 12)
        let other = try Tools.run(
            "strun", ["generate", path, "--tokens", "5,6,7", "-n", "12", "--temperature", "1.0", "--seed", "43", "--ids"])
        #expect(other.stdout != first.stdout, "another seed, another draw")
    }

    @Test func compareReportsAgreementAsJSON() throws {
        let scratch = ToolScratch()
        let float = try package(scratch, "tiny-4b-like", ["--dtype", "f32"])
        let q8 = scratch.file("q8.stpk")
        #expect(try Tools.run("stquant", [float, "-o", q8, "--type", "q8_0", "-q"]).status == 0)
        let same = try Tools.run("strun", ["compare", float, float, "--json"])
        #expect(same.status == 0, "\(same.stderr)")
        let identical = try JSONSerialization.jsonObject(with: Data(same.stdout.utf8)) as! [String: Any]
        #expect(identical["top1_agreement"] as? Double == 1)
        #expect(identical["mean_kl"] as? Double == 0)
        #expect(identical["positions"] as? Int == 128)
        let tokensFile = scratch.file("tokens.txt")
        try "1 2 3\n4,5,6,7,8\n".write(toFile: tokensFile, atomically: true, encoding: .utf8)
        let result = try Tools.run("strun", ["compare", float, q8, "--tokens-file", tokensFile, "--json"])
        #expect(result.status == 0, "\(result.stderr)")
        let report = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as! [String: Any]
        #expect(report["positions"] as? Int == 8)
        for key in ["mean_kl", "p99_kl", "top1_agreement", "max_abs_logit_difference", "base_perplexity", "other_perplexity"] {
            #expect(report[key] is Double, "\(key)")
        }
        #expect((report["mean_kl"] as! Double) > 0)
        let text = try Tools.run("strun", ["compare", float, q8, "--tokens", "1,2,3"])
        #expect(text.stdout.contains("top-1 agreement"))
    }

    /// stquant stores Q4_0 rows grouped by default and strun runs such a package silently; a
    /// `--plain-rows` package runs to the same greedy tokens, with a note on how to arrange it,
    /// and arranging it with stquant gives the default package byte for byte.
    @Test func plainRowPackagesRunWithANoteAndRearrange() throws {
        let scratch = ToolScratch()
        let float = try package(scratch, "tiny-4b-like", ["--dtype", "f32"])
        let (grouped, plain, rearranged) = (scratch.file("g.stpk"), scratch.file("p.stpk"), scratch.file("r.stpk"))
        #expect(try Tools.run("stquant", [float, "-o", grouped, "--type", "q4_0", "-q"]).status == 0)
        #expect(try Tools.run("stquant", [float, "-o", plain, "--type", "q4_0", "--plain-rows", "-q"]).status == 0)
        let inspect = try Tools.run("strun", ["inspect", plain])
        #expect(inspect.stdout.contains("0 in groups of eight rows"), "\(inspect.stdout)")
        let tokens = ["--tokens", "5,6,7", "-n", "8", "--temperature", "0", "--ids"]
        let a = try Tools.run("strun", ["generate", grouped] + tokens), b = try Tools.run("strun", ["generate", plain] + tokens)
        #expect(a.status == 0 && b.status == 0 && a.stdout == b.stdout && !a.stdout.isEmpty)
        #expect(a.stderr.isEmpty, "\(a.stderr)")
        #expect(b.stderr.contains("plain rows") && b.stderr.contains("stquant \(plain) -o"), "\(b.stderr)")
        #expect(try Tools.run("stquant", [plain, "-o", rearranged, "--type", "q4_0", "-q"]).status == 0)
        let fresh = try Data(contentsOf: URL(fileURLWithPath: grouped)), again = try Data(contentsOf: URL(fileURLWithPath: rearranged))
        // Same tensors byte for byte; only the provenance (source package name and size) differs.
        let groupedReader = try PackageReader(path: grouped), rearrangedReader = try PackageReader(path: rearranged)
        for t in groupedReader.manifest.tensors {
            let u = rearrangedReader.tensor(t.name)!
            #expect(fresh[t.offset..<t.offset + t.length] == again[u.offset..<u.offset + u.length], "\(t.name)")
        }
    }

    @Test func runErrorsAreClear() throws {
        let scratch = ToolScratch()
        let path = try package(scratch, "tiny-4b-like")
        let outOfVocab = try Tools.run("strun", ["generate", path, "--tokens", "1,600", "--ids", "-n", "2"])
        #expect(outOfVocab.status == 1 && outOfVocab.stderr.contains("token id 600 is outside the vocabulary"))
        let full = try Tools.run("strun", ["logits", path, "--tokens", "1,2,3,4", "--context", "3", "-o", scratch.file("x.f32")])
        #expect(full.status == 1 && full.stderr.contains("context is full (3 tokens)"))
        #expect(!FileManager.default.fileExists(atPath: scratch.file("x.f32")))
        let badTokens = try Tools.run("strun", ["logits", path, "--tokens", "1,x", "-o", scratch.file("y.f32")])
        #expect(badTokens.status != 0 && badTokens.stderr.contains("'x' is not a token id"))
        let noIDs = try Tools.run("strun", ["generate", path, "--tokens", "1"])
        #expect(noIDs.status != 0 && noIDs.stderr.contains("--ids"))
    }
}

/// STRUN_KERNELS through the built strun: each tier this CPU has runs and is reported, with the
/// same generated tokens as the default where the model's margins are clear; a tier that does
/// not exist, or that this CPU lacks, is one clear line and exit 1.
@Suite struct KernelTierCommandTests {
    @Test func theForcedTierRunsAndIsReported() throws {
        let scratch = ToolScratch()
        let path = scratch.file("m.stpk")
        #expect(try Tools.run("stconvert", [Tools.fixtures + "/tiny-4b-like", "-o", path, "-q"]).status == 0)
        let detected = try Tools.run("strun", ["--version"], environment: ["STRUN_KERNELS": ""])  // empty: not set
        #expect(detected.stdout.contains("kernels: ") && detected.stdout.contains("the best this CPU has"), "\(detected.stdout)")
        var supported: [String] = []
        for tier in ["portable", "avx2", "avx512", "neon", "neon-dotprod"] {
            let bench = try Tools.run(
                "strun", ["bench", path, "-p", "4", "-n", "4", "-r", "1", "--json"], environment: ["STRUN_KERNELS": tier])
            if bench.status == 0 {
                let report = try JSONSerialization.jsonObject(with: Data(bench.stdout.utf8)) as! [String: Any]
                #expect(report["kernels"] as? String == tier && report["kernels_forced"] as? Bool == true)
                let text = try Tools.run("strun", ["bench", path, "-p", "4", "-n", "4", "-r", "1"], environment: ["STRUN_KERNELS": tier])
                #expect(text.stdout.contains("kernels: \(tier) (forced by STRUN_KERNELS"), "\(text.stdout)")
                let version = try Tools.run("strun", ["--version"], environment: ["STRUN_KERNELS": tier])
                #expect(version.stdout.contains("kernels: \(tier) (forced by STRUN_KERNELS"))
                supported.append(tier)
            } else {
                #expect(
                    bench.status == 1
                        && bench.stderr.hasPrefix("strun: error: STRUN_KERNELS=\(tier) asks for the \(tier) kernels, which need"),
                    "\(bench.stderr)")
                #expect(bench.stderr.split(separator: "\n").count == 1)
            }
        }
        #expect(supported.first == "portable")
        let bad = try Tools.run("strun", ["generate", path, "--tokens", "1,2", "-n", "2", "--ids"], environment: ["STRUN_KERNELS": "sse9"])
        #expect(
            bad.status == 1
                && bad.stderr
                    == "strun: error: STRUN_KERNELS=sse9 names no kernel tier; use one of portable, avx2, avx512, neon, neon-dotprod, "
                    + "or unset it for the best this CPU has (\(supported.last!))\n",
            "\(bad.stderr)")
    }
}

/// --memory-budget through the built strun.
@Suite struct BudgetCommandTests {
    @Test func budgetedGenerationMatchesAndBenchReportsCounters() throws {
        let scratch = ToolScratch()
        let path = scratch.file("m.stpk")
        #expect(try Tools.run("stconvert", [Tools.fixtures + "/tiny-21b-like", "-o", path, "-q"]).status == 0)
        let args = ["generate", path, "--tokens", "5,6,7,8", "-n", "12", "--temperature", "0", "--ids", "--context", "64"]
        let free = try Tools.run("strun", args)
        let budgeted = try Tools.run("strun", args + ["--memory-budget", "80MiB"])
        #expect(budgeted.status == 0, "\(budgeted.stderr)")
        #expect(budgeted.stdout == free.stdout)
        let bench = try Tools.run("strun", ["bench", path, "-p", "4", "-n", "8", "-r", "1", "--memory-budget", "80MiB", "--json"])
        #expect(bench.status == 0, "\(bench.stderr)")
        let report = try JSONSerialization.jsonObject(with: Data(bench.stdout.utf8)) as! [String: Any]
        for key in ["expert_hit_rate", "expert_bytes_read_per_token", "io_stall_seconds_per_token", "expert_cache_bytes"] {
            #expect(report[key] is NSNumber, "\(key)")
        }
        #expect(report["memory_budget_bytes"] as? Int == 80 << 20)
        let tooSmall = try Tools.run("strun", args + ["--memory-budget", "1MB"])
        #expect(tooSmall.status == 1 && tooSmall.stderr.contains("cannot hold the dense part"))
        let badUnit = try Tools.run("strun", args + ["--memory-budget", "lots"])
        #expect(
            badUnit.status != 0 && badUnit.stderr.contains("'lots' is invalid for '--memory-budget")
                && badUnit.stderr.contains("such as 1GiB"))
    }

    /// The budget holds in fact: at the smallest budget strun accepts (which bench reports) the
    /// peak RSS the kernel measured (VmHWM) stays inside it, most experts stream, and one byte
    /// less is refused. Run from a test process holding 128 MiB more, it also guards the measurement: a read
    /// of /proc/self/status by its reported size (0) fell back to ru_maxrss, which carries the
    /// parent's resident set across exec (88–134 MB reported for a 28 MB strun).
    @Test(.disabled(if: Tools.addressSanitized, "ASan's shadow memory and quarantine are resident too"))
    func theSmallestBudgetIsReportedAndHolds() throws {
        let scratch = ToolScratch()
        let path = scratch.file("m.stpk")
        let trained = URL(fileURLWithPath: Tools.fixtures).deletingLastPathComponent().appendingPathComponent("trained/trained-21b-like")
        #expect(try Tools.run("stconvert", [trained.path, "-o", path, "-q", "--type", "q4_0"]).status == 0)
        let args = ["bench", path, "-p", "16", "-n", "32", "-r", "1", "--json"]
        func report(_ extra: [String]) throws -> [String: Any] {
            let run = try Tools.run("strun", args + extra)
            #expect(run.status == 0, "\(run.stderr)")
            return try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any] ?? [:]
        }
        let minimum = try #require(try report([])["minimum_memory_budget_bytes"] as? Int)
        let package = try FileManager.default.attributesOfItem(atPath: path)[.size] as! Int
        // A parent larger than the budget, whatever else the test runner holds at the moment.
        let ballast = [UInt8](repeating: 1, count: 128 << 20)
        let budgeted = try withExtendedLifetime(ballast) { try report(["--memory-budget", "\(minimum)"]) }
        #expect(budgeted["memory_budget_bytes"] as? Int == minimum)
        let peak = try #require(budgeted["peak_rss_bytes"] as? Int)
        #expect(peak <= minimum, "peak RSS \(peak) over the budget \(minimum)")
        #expect(budgeted["expert_cache_bytes"] as? Int ?? .max < package / 4, "the budget should stream most experts")
        #expect((budgeted["expert_hit_rate"] as? Double ?? 1) < 1)
        let under = try Tools.run("strun", args + ["--memory-budget", "\(minimum - 1)"])
        #expect(under.status == 1 && under.stderr.contains("strun: error: "), "\(under.stderr)")
    }
}
