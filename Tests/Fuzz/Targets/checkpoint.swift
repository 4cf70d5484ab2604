// libFuzzer target: opening a Hugging Face checkpoint folder. The first input byte picks which
// of its three files the rest of the input replaces (config.json, the shard index, or a
// safetensors shard); the other two come from a valid micro checkpoint. A folder that opens is
// then read tensor by tensor, as the converter would.
import Format

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzCheckpoint(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size > 0 else { return 0 }
    let files = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"]
    let fuzzed = Int(data[0]) % files.count
    for (i, name) in files.enumerated() where i != fuzzed { Scratch.copy(seedDirectory + "/micro-checkpoint/" + name, to: name) }
    Scratch.copy(seedDirectory + "/micro-checkpoint/model-00002-of-00002.safetensors", to: "model-00002-of-00002.safetensors")
    _ = Scratch.write(data + 1, size - 1, to: files[fuzzed])
    guard let checkpoint = try? Checkpoint(directory: Scratch.directory) else { return 0 }
    var buffer = [UInt8](repeating: 0, count: 1 << 16)
    for (_, tensor) in checkpoint.tensors {
        guard let shard = checkpoint.shards[tensor.path] else { fatalError("a tensor names a shard that was not opened") }
        let count = min(buffer.count, tensor.length)
        _ = buffer.withUnsafeMutableBytes { try? shard.read(tensor, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<count])) }
    }
    return 0
}
