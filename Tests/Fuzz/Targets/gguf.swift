// libFuzzer target: a GGUF file as stconvert imports it: the reader (header, metadata,
// tensor table), then the import plan (architecture, shapes, types, the tokenizer it carries).
import Format

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzGGUF(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let path = Scratch.write(data, size, to: "input.gguf")
    guard let file = try? GGUFFile(path: path) else { return 0 }
    for tensor in file.tensors { _ = file.bytes(of: tensor).count }
    _ = try? GGUFImport.plan(file)
    return 0
}
