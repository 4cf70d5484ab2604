// libFuzzer target: a .stpk package as strun opens it: header, manifest and structural checks
// (PackageReader), then verify (every checksum), then the model on top of it and one token
// through a session, which trusts the reader's checks to map every tensor it needs.
import Engine
import Format

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzPackage(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let path = Scratch.write(data, size, to: "input.stpk")
    guard let reader = try? PackageReader(path: path) else { return 0 }
    _ = try? reader.verify()
    guard let model = try? Model(package: reader) else { return 0 }
    guard let session = try? Session(model: model, contextLength: 8, threads: 1) else { return 0 }
    _ = try? session.evaluate([0])
    return 0
}
