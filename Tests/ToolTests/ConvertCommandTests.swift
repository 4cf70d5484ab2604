import Foundation
import Testing

/// stconvert and strun inspect/verify, run as built binaries.
@Suite struct ConvertCommandTests {
    @Test(arguments: ["stconvert", "strun", "stquant"])
    func helpDescribesTheCommand(tool: String) throws {
        let result = try Tools.run(tool, ["--help"])
        #expect(result.status == 0)
        #expect(result.stdout.contains("USAGE: \(tool)"))
    }

    @Test func convertThenVerifyAndInspect() throws {
        let scratch = ToolScratch()
        let output = scratch.file("model.stpk")
        let convert = try Tools.run("stconvert", [Tools.fixtures + "/tiny-21b-like", "-o", output])
        #expect(convert.status == 0, "\(convert.stderr)")
        #expect(convert.stdout.contains("wrote \(output)"))
        #expect(convert.stderr.isEmpty, "no progress output when stderr is not a terminal")

        let verify = try Tools.run("strun", ["verify", output])
        #expect(verify.status == 0, "\(verify.stderr)")
        #expect(verify.stdout.contains("OK"))

        let inspect = try Tools.run("strun", ["inspect", output])
        #expect(inspect.status == 0)
        #expect(inspect.stdout.contains("128 bundles"))
        #expect(inspect.stdout.contains("01110111"))

        let json = try Tools.run("strun", ["inspect", output, "--json"])
        #expect(json.status == 0)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any])
        #expect(object["format_version"] as? String == "3.0")
        let config = try #require(object["config"] as? [String: Any])
        #expect(config["num_hidden_layers"] as? Int == 8)
        #expect(config["moe_primary_router_apply_softmax"] as? Bool == true)
        let tensors = try #require(object["tensors"] as? [[String: Any]])
        let expectedCount: Int = 8 * 7 + 2 + 8 * 16 * 3  // per-layer dense, embedding + final norm, experts
        #expect(tensors.count == expectedCount)
        for key in ["name", "source_name", "dtype", "shape", "layout", "offset", "length"] {
            #expect(tensors.allSatisfy { $0[key] != nil }, "every tensor has \(key)")
        }
        let down = try #require(tensors.first { $0["name"] as? String == "layers.7.experts.15.down" })
        #expect(down["layout"] as? String == "transposed")
        #expect(down["shape"] as? [Int] == [48, 96])
        #expect(down["source_name"] as? String == "model.layers.7.block_sparse_moe.experts.15.down.weight")
        let bundles = try #require(object["expert_bundles"] as? [[String: Any]])
        #expect(bundles.count == 128)
        #expect(bundles.allSatisfy { ($0["offset"] as! Int) % 4096 == 0 && ($0["length"] as! Int) % 4096 == 0 })
        #expect(bundles[17]["layer"] as? Int == 1 && bundles[17]["expert"] as? Int == 1)
        #expect(bundles[17]["tensors"] as? [String] == ["layers.1.experts.1.gate", "layers.1.experts.1.up", "layers.1.experts.1.down"])
    }

    @Test func verifyNamesTheCorruptTensorAndItsOffset() throws {
        let scratch = ToolScratch()
        let output = scratch.file("model.stpk")
        #expect(try Tools.run("stconvert", [Tools.fixtures + "/tiny-4b-like", "-o", output, "--quiet"]).status == 0)
        let json =
            try JSONSerialization.jsonObject(with: Data(try Tools.run("strun", ["inspect", "--json", output]).stdout.utf8))
            as! [String: Any]
        let target = (json["tensors"] as! [[String: Any]]).first { $0["name"] as? String == "layers.2.experts.3.up" }!
        let offset = target["offset"] as! Int
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: output))
        try handle.seek(toOffset: UInt64(offset + 10))
        let byte = try handle.read(upToCount: 1)!
        try handle.seek(toOffset: UInt64(offset + 10))
        handle.write(Data([byte[0] ^ 0x40]))
        try handle.close()

        let verify = try Tools.run("strun", ["verify", output])
        #expect(verify.status == 1)
        #expect(verify.stderr.contains("layers.2.experts.3.up"))
        #expect(verify.stderr.contains("at byte \(offset)"))
        #expect(verify.stdout.isEmpty)
    }

    @Test func errorsExitNonZeroWithOneLine() throws {
        let scratch = ToolScratch()
        let missing = try Tools.run("stconvert", [scratch.file("nope"), "-o", scratch.file("x.stpk")])
        #expect(missing.status == 1)
        #expect(missing.stderr.hasPrefix("stconvert: error: "))
        #expect(missing.stderr.contains("nope"))

        let noOutput = try Tools.run("stconvert", [Tools.fixtures + "/tiny-4b-like"])
        #expect(noOutput.status != 0)
        #expect(noOutput.stderr.contains("--output"))

        let badType = try Tools.run("stconvert", [Tools.fixtures + "/tiny-4b-like", "-o", scratch.file("x.stpk"), "--dtype", "q4_0"])
        #expect(badType.status != 0)
        #expect(badType.stderr.contains("stquant"))

        let notPackage = try Tools.run("strun", ["verify", Tools.fixtures + "/tiny-4b-like/config.json"])
        #expect(notPackage.status == 1)
        #expect(notPackage.stderr.contains("not a .stpk package"))
        #expect(scratch.entries.isEmpty)
    }

    @Test func existingOutputNeedsForce() throws {
        let scratch = ToolScratch()
        let output = scratch.file("model.stpk")
        #expect(try Tools.run("stconvert", [Tools.fixtures + "/tiny-4b-like", "-o", output, "-q"]).status == 0)
        let again = try Tools.run("stconvert", [Tools.fixtures + "/tiny-4b-like", "-o", output, "--dtype", "f32"])
        #expect(again.status == 1)
        #expect(again.stderr.contains("--force"))
        let forced = try Tools.run("stconvert", [Tools.fixtures + "/tiny-4b-like", "-o", output, "--dtype", "f32", "--force", "-q"])
        #expect(forced.status == 0)
        #expect(forced.stdout.isEmpty)
        #expect(try Tools.run("strun", ["inspect", output]).stdout.contains("f32 × 126"))
        #expect(scratch.entries == ["model.stpk"])
    }

    @Test func dryRunWritesNothing() throws {
        let scratch = ToolScratch()
        let result = try Tools.run("stconvert", [Tools.fixtures + "/tiny-untied", "-o", scratch.file("x.stpk"), "--dry-run"])
        #expect(result.status == 0)
        #expect(result.stdout.contains("output                       bf16  [512, 64]"))
        #expect(result.stdout.contains("would write"))
        #expect(scratch.entries.isEmpty)
    }
}
