import Foundation
import Testing

/// stquant, run as a built binary.
@Suite struct QuantCommandTests {
    func floatPackage(_ scratch: ToolScratch, _ model: String = "tiny-21b-like") throws -> String {
        let path = scratch.file("float.stpk")
        let result = try Tools.run("stconvert", [Tools.fixtures + "/" + model, "-o", path, "-q"])
        #expect(result.status == 0, "\(result.stderr)")
        return path
    }

    @Test func quantiseVerifyAndReport() throws {
        let scratch = ToolScratch()
        let float = try floatPackage(scratch)
        let out = scratch.file("q4.stpk")
        let result = try Tools.run("stquant", [float, "-o", out, "--type", "q4_0"])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("bits per weight"))
        #expect(result.stdout.contains("expert"))
        #expect(try Tools.run("strun", ["verify", out]).status == 0)
        let inspect = try Tools.run("strun", ["inspect", out])
        // f32: 17 norms + 8 routers; q4_0: embedding + 8 × 4 attention + 128 × 3 expert matrices.
        #expect(inspect.stdout.contains("f32 × 25, q4_0 × 417"))
    }

    @Test func jsonReportListsEveryTensor() throws {
        let scratch = ToolScratch()
        let float = try floatPackage(scratch, "tiny-untied")
        let result = try Tools.run("stquant", [float, "-o", scratch.file("q8.stpk"), "--type", "q8_0", "--json"])
        #expect(result.status == 0, "\(result.stderr)")
        let report = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        #expect(report["type"] as? String == "q8_0")
        let tensors = try #require(report["tensors"] as? [[String: Any]])
        #expect(tensors.count == 127)
        let output = try #require(tensors.first { $0["name"] as? String == "output" })
        #expect(output["to"] as? String == "q8_0")
        #expect((output["relative_rmse"] as? Double).map { $0 > 0 && $0 < 0.01 } == true)
        #expect((report["size_after"] as! Int) < (report["size_before"] as! Int))
    }

    @Test func dryRunShowsThePolicyAndWritesNothing() throws {
        let scratch = ToolScratch()
        let float = try floatPackage(scratch)
        let result = try Tools.run(
            "stquant", [float, "-o", scratch.file("x.stpk"), "--type", "q4_0", "--dry-run", "--tensor-type", "layers.*.attn_v=q8_0"])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("layers.3.attn_v              bf16  -> q8_0  override layers.*.attn_v=q8_0"))
        #expect(result.stdout.contains("layers.3.router              bf16  -> f32   router: kept in f32"))
        #expect(result.stdout.contains("128 × gate: bf16 -> q4_0 (default)"))
        #expect(scratch.entries == ["float.stpk"])
    }

    @Test func errorsExitNonZero() throws {
        let scratch = ToolScratch()
        let float = try floatPackage(scratch, "tiny-4b-like")
        let badType = try Tools.run("stquant", [float, "-o", scratch.file("x.stpk"), "--type", "q5_k"])
        #expect(badType.status != 0 && badType.stderr.contains("q4_0 or q8_0"))
        let badOverride = try Tools.run("stquant", [float, "-o", scratch.file("x.stpk"), "--type", "q4_0", "--tensor-type", "token_embd"])
        #expect(badOverride.status == 1 && badOverride.stderr.contains("PATTERN=TYPE"))
        #expect(try Tools.run("stquant", [float, "-o", scratch.file("q.stpk"), "--type", "q4_0", "-q"]).status == 0)
        let exists = try Tools.run("stquant", [float, "-o", scratch.file("q.stpk"), "--type", "q4_0"])
        #expect(exists.status == 1 && exists.stderr.contains("--force"))
        let requant = try Tools.run("stquant", [scratch.file("q.stpk"), "-o", scratch.file("q8.stpk"), "--type", "q8_0"])
        #expect(requant.status == 1 && requant.stderr.contains("--allow-requantize"))
        let notPackage = try Tools.run(
            "stquant", [Tools.fixtures + "/tiny-4b-like/model.safetensors", "-o", scratch.file("y.stpk"), "--type", "q4_0"])
        #expect(notPackage.status == 1 && notPackage.stderr.contains("not a .stpk package"))
        #expect(scratch.entries == ["float.stpk", "q.stpk"])
    }
}
