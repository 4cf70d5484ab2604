import Foundation
import Testing

/// The README's main command on the trained fixture, run as a user runs it: convert, quantise to
/// Q4_0, verify, generate text from a text prompt, and compare the quantised package with the
/// float one over held-out text.
@Suite struct TrainedModelCommandTests {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/trained/trained-21b-like").path

    static func sequence(_ name: String) throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: directory + "/reference.json"))
        let json = try JSONSerialization.jsonObject(with: data) as! [String: Any]
        return (json["sequences"] as! [String: Any])[name] as! [String: Any]
    }

    /// The bf16 package, run greedily from the held-out prompt as text, prints the PyTorch
    /// model's greedy continuation as text. The fixture's greedy steps have margins of at least
    /// `greedy_min_margin` between the first and second logits, far above float rounding.
    @Test func textPromptGeneratesTheReferenceContinuation() throws {
        let scratch = ToolScratch()
        let package = scratch.file("trained.stpk")
        var result = try Tools.run("stconvert", [Self.directory, "-o", package, "-q"])
        #expect(result.status == 0, "\(result.stderr)")
        for name in ["short", "long"] {
            let s = try Self.sequence(name)
            #expect((s["greedy_min_margin"] as! Double) > 0.01, "the fixture's greedy margins must be clear for this test")
            result = try Tools.run("strun", ["generate", package, "-p", s["text"] as! String, "-n", "16", "--temperature", "0"])
            #expect(result.status == 0, "\(result.stderr)")
            #expect(result.stdout == (s["greedy_text"] as! String) + "\n", "\(name)")
        }
    }

    /// What quantisation costs on a trained model, measured free-running over held-out text by
    /// `strun compare` (a trained model is not chaotic: Q8_0 and Q4_0 leave it on the same
    /// course, so the free-running KL is meaningful here, unlike on the random fixtures). Bounds:
    /// 1.5x the values measured when they were written (`TrainedBounds`).
    @Test func quantisationCostIsSmallOnTheTrainedModel() throws {
        let scratch = ToolScratch()
        let base = scratch.file("trained.stpk")
        var result = try Tools.run("stconvert", [Self.directory, "-o", base, "-q"])
        #expect(result.status == 0, "\(result.stderr)")
        let text = URL(fileURLWithPath: Self.directory).deletingLastPathComponent().appendingPathComponent("held-out-sample.txt").path
        var kl: [String: Double] = [:]
        for (type, bound) in [("q8_0", TrainedBounds.q8MeanKL), ("q4_0", TrainedBounds.q4MeanKL)] {
            let quantised = scratch.file("trained-\(type).stpk")
            result = try Tools.run("stquant", [base, "-o", quantised, "--type", type])
            #expect(result.status == 0, "\(result.stderr)")
            result = try Tools.run("strun", ["verify", quantised])
            #expect(result.status == 0, "\(result.stderr)")
            result = try Tools.run("strun", ["compare", base, quantised, "--file", text, "--json"])
            #expect(result.status == 0, "\(result.stderr)")
            let json = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as! [String: Any]
            kl[type] = json["mean_kl"] as? Double
            #expect(json["positions"] as? Int == 1990)
            #expect(kl[type]! <= bound, "\(type): mean KL \(kl[type]!)")
        }
        #expect(kl["q8_0"]! < kl["q4_0"]! / 5, "eight bits cost much less than four: \(kl)")
    }
}

extension TrainedModelCommandTests {
    /// `strun stats` over held-out text, as a user runs it: the held-out routing check of
    /// reference.json through `--tokens` and `--context` (the windows the PyTorch statistics used)
    /// gives its expert counts to within a flipped near-tie, and the text report has a row per layer.
    @Test func statsReportsTheReferenceRouting() throws {
        let scratch = ToolScratch()
        let package = scratch.file("trained.stpk")
        var result = try Tools.run("stconvert", [Self.directory, "-o", package, "-q", "--dtype", "f32"])
        #expect(result.status == 0, "\(result.stderr)")
        let data = try Data(contentsOf: URL(fileURLWithPath: Self.directory + "/reference.json"))
        let check = (try JSONSerialization.jsonObject(with: data) as! [String: Any])["routing_check"] as! [String: Any]
        let ids = check["input_ids"] as! [Int]
        result = try Tools.run(
            "strun",
            [
                "stats", package, "--tokens", ids.map(String.init).joined(separator: ","),
                "--context", String(check["window"] as! Int), "--json"
            ])
        #expect(result.status == 0, "\(result.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as! [String: Any]
        #expect(json["tokens"] as? Int == ids.count)
        let layers = json["layers"] as! [[String: Any]], expected = check["layers"] as! [[String: Any]]
        #expect(layers.count == 8)
        for (ours, theirs) in zip(layers, expected) {
            let a = ours["expert_counts"] as! [Int], b = theirs["expert_counts"] as! [Int]
            let moved: Int = zip(a, b).map { abs($0 - $1) }.reduce(0, +), allowed: Int = 2 * max(1, b.reduce(0, +) / 100)
            #expect(moved <= allowed, "layer \(ours["layer"]!): \(a) against \(b)")
        }
        #expect(layers[0]["predicted_recall"] is NSNull && layers[1]["predicted_recall"] is Double)
        let text = URL(fileURLWithPath: Self.directory).deletingLastPathComponent().appendingPathComponent("held-out-sample.txt").path
        result = try Tools.run("strun", ["stats", package, "--file", text])
        #expect(result.status == 0, "\(result.stderr)")
        let lines = result.stdout.split(separator: "\n")
        #expect(lines.first?.hasPrefix("1990 tokens; 16 experts, 4 chosen per token") == true, "\(result.stdout)")
        #expect(lines.count == 2 + 8)
        result = try Tools.run("strun", ["stats", package])
        #expect(result.status != 0 && result.stderr.contains("give the text to measure on"), "\(result.stderr)")
    }
}

extension TrainedModelCommandTests {
    /// `strun bench --text-file` under a budget that holds three quarters of the experts, with
    /// cross-layer prefetch on and off: the counters add up (a pick per chosen expert; every miss
    /// and speculative read a whole bundle), speculation is reported, and on this model's real
    /// routing it raises the hit rate. Generation prints the same text with and without it.
    @Test func benchOnRealTextReportsHonestStreamingCounters() throws {
        let scratch = ToolScratch()
        let package = scratch.file("trained.stpk")
        var result = try Tools.run("stconvert", [Self.directory, "-o", package, "-q"])
        #expect(result.status == 0, "\(result.stderr)")
        let quantised = scratch.file("trained-q4_0.stpk")
        #expect(try Tools.run("stquant", [package, "-o", quantised, "--type", "q4_0"]).status == 0)
        let text = URL(fileURLWithPath: Self.directory).deletingLastPathComponent().appendingPathComponent("held-out-sample.txt").path
        var hitRates: [String: Double] = [:]
        for mode in ["off", "on"] {
            // 512 positions: 73.2 MiB leaves 96 of the 128 bundles (of 56 KiB each).
            result = try Tools.run(
                "strun",
                [
                    "bench", quantised, "-p", "16", "-n", "496", "-r", "1", "--memory-budget", "73.2MiB",
                    "--text-file", text, "--cross-layer-prefetch", mode, "--json"
                ])
            #expect(result.status == 0, "\(result.stderr)")
            let r = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as! [String: Any]
            let hits = r["expert_hits"] as! Int, misses = r["expert_misses"] as! Int, bundle = r["expert_bundle_bytes"] as! Int
            let read = r["expert_bytes_read"] as! Int, speculative = r["speculative_reads"] as! Int
            #expect(hits + misses == 496 * 8 * 4, "one pick per chosen expert")
            #expect(read >= misses * bundle * 9 / 10 && read <= (misses + speculative) * bundle, "\(r)")
            #expect(r["cross_layer_prefetch"] as? String == mode)
            if mode == "off" {
                #expect(speculative == 0 && r["speculative_used"] as? Int == 0)
            } else {
                #expect((r["speculative_used"] as! Int) > (r["speculative_wasted"] as! Int), "\(r)")
            }
            hitRates[mode] = r["expert_hit_rate"] as? Double
        }
        #expect(hitRates["on"]! > hitRates["off"]! + 0.03, "\(hitRates)")
        let prompt = ["generate", quantised, "-p", "And it came to pass", "-n", "24", "--temperature", "0", "--context", "64"]
        let free = try Tools.run("strun", prompt)
        for mode in ["on", "off", "auto"] {
            let budgeted = try Tools.run("strun", prompt + ["--memory-budget", "70MiB", "--cross-layer-prefetch", mode])
            #expect(budgeted.status == 0 && budgeted.stdout == free.stdout, "\(mode): \(budgeted.stderr)")
        }
        result = try Tools.run("strun", ["bench", quantised, "-p", "16", "-n", "3000", "--text-file", text])
        #expect(result.status != 0 && result.stderr.contains("encodes to 1990 tokens"), "\(result.stderr)")
        result = try Tools.run("strun", prompt + ["--memory-budget", "70MiB", "--cross-layer-prefetch", "sometimes"])
        #expect(result.status != 0 && result.stderr.contains("takes on, off or auto"), "\(result.stderr)")
    }
}

/// Mean KL(float ‖ quantised) over the 1,990 tokens of held-out-sample.txt, measured on every
/// tier (portable, AVX2, AVX-512 agree to 1%: Q8_0 0.00264–0.00267, Q4_0 0.0402–0.0403), times 1.5.
enum TrainedBounds {
    static let q8MeanKL = 0.004
    static let q4MeanKL = 0.06
}

extension TrainedModelCommandTests {
    /// Bytes of the trained model's KV caches for `sequences` sequences of `context` positions
    /// in `bytesPerRow`-byte rows, from its config.json (not the engine's plan): every position
    /// in the global layers, the window and a batch of 128 in the sliding-window ones.
    static func kvBytes(context: Int, sequences: Int, bytesPerRow: Int) throws -> Int {
        let data = try Data(contentsOf: URL(fileURLWithPath: directory + "/config.json"))
        let config = try JSONSerialization.jsonObject(with: data) as! [String: Any]
        let windows = config["sliding_window_layout"] as! [Int], window = config["sliding_window_size"] as! Int
        let heads = config["num_key_value_heads"] as! Int
        let positions = windows.map { $0 == 1 ? min(context, window + 128) : context }.reduce(0, +)
        return sequences * positions * 2 * heads * bytesPerRow
    }

    /// The KV cache types as a user meets them: `strun inspect` plans the memory of a context and
    /// sequence count for a type before anything runs (KV bytes as config.json gives them: 64
    /// values a row are 256, 128 or 68 bytes), `strun bench` reports the type and bytes it ran
    /// with, `strun compare` measures what float16 costs against float32 over held-out text, every
    /// type generates, and an unknown type is a clear error.
    @Test func kvCacheTypesThroughTheCommands() throws {
        let scratch = ToolScratch()
        let package = scratch.file("trained.stpk"), quantised = scratch.file("trained-q4_0.stpk")
        #expect(try Tools.run("stconvert", [Self.directory, "-o", package, "-q"]).status == 0)
        #expect(try Tools.run("stquant", [package, "-o", quantised, "--type", "q4_0"]).status == 0)
        var plans: [(kv: Int, minimum: Int, fitting: Int)] = []
        for (type, row) in [("f32", 256), ("f16", 128), ("q8_0", 68)] {
            var result = try Tools.run(
                "strun", ["inspect", quantised, "--context", "1024", "-np", "3", "--kv-type", type, "--memory-budget", "80MiB", "--json"])
            #expect(result.status == 0, "\(result.stderr)")
            let plan = (try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as! [String: Any])["memory_plan"] as! [String: Any]
            let kv = try Self.kvBytes(context: 1024, sequences: 3, bytesPerRow: row)
            #expect(plan["kv_cache_bytes"] as? Int == kv, "\(type): \(plan)")
            #expect(plan["kv_type"] as? String == type)
            plans.append((kv, plan["minimum_memory_budget_bytes"] as? Int ?? 0, plan["sequences_fitting_budget"] as? Int ?? 0))
            result = try Tools.run("strun", ["inspect", quantised, "--context", "1024", "-np", "3", "--kv-type", type])
            #expect(result.status == 0 && result.stdout.contains("memory for 3 sequences of 1024 tokens"), "\(result.stdout)")
            #expect(result.stdout.contains("KV cache \(type):"), "\(result.stdout)")
            result = try Tools.run("strun", ["bench", quantised, "-p", "40", "-n", "8", "-r", "1", "--kv-type", type, "--json"])
            #expect(result.status == 0, "\(result.stderr)")
            let bench = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as! [String: Any]
            #expect(bench["kv_type"] as? String == type)
            #expect(bench["kv_cache_bytes"] as? Int == (try Self.kvBytes(context: 48, sequences: 1, bytesPerRow: row)), "\(bench)")
            result = try Tools.run(
                "strun", ["generate", quantised, "-p", "And it came to pass", "-n", "12", "--kv-type", type, "--seed", "1"])
            #expect(result.status == 0 && result.stdout.count > 12, "\(type): \(result.stderr)")
        }
        // The minimum budget moves by exactly the KV bytes saved, and the smaller the type, the
        // more sequences of this context 80 MiB holds (three in f32).
        #expect(plans[0].minimum - plans[1].minimum == plans[0].kv - plans[1].kv, "\(plans)")
        #expect(plans[1].minimum - plans[2].minimum == plans[1].kv - plans[2].kv, "\(plans)")
        #expect(plans[0].fitting >= 3 && plans[0].fitting < plans[1].fitting && plans[1].fitting < plans[2].fitting, "\(plans)")
        let text = URL(fileURLWithPath: Self.directory).deletingLastPathComponent().appendingPathComponent("held-out-sample.txt").path
        var result = try Tools.run(
            "strun", ["compare", quantised, quantised, "--base-kv-type", "f32", "--kv-type", "f16", "--file", text, "--json"])
        #expect(result.status == 0, "\(result.stderr)")
        let c = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as! [String: Any]
        let kl = c["mean_kl"] as! Double, top1 = c["top1_agreement"] as! Double
        #expect(kl > 0 && kl < 1e-3 && top1 >= 0.99, "f16 against f32: mean KL \(kl), top-1 \(top1)")
        result = try Tools.run("strun", ["generate", quantised, "-p", "And", "--kv-type", "f8"])
        #expect(result.status != 0 && result.stderr.contains("f8") && result.stderr.contains("q8_0"), "\(result.stderr)")
        result = try Tools.run("strun", ["inspect", package, "--kv-type", "q8_0", "--context", "0"])
        #expect(result.status != 0 && result.stderr.contains("--context"), "\(result.stderr)")
    }
}
