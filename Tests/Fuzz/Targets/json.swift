// libFuzzer target: the JSON parser. Whatever it accepts must serialise and parse back to the
// same value (compact and pretty); whatever it rejects must be a thrown Failure, not a crash.
import Format

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzJSON(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard let value = try? JSONParser.parse(UnsafeBufferPointer(start: data, count: size)) else { return 0 }
    for pretty in [false, true] {
        let text = JSONWriter.serialize(value, pretty: pretty)
        guard let again = try? JSONParser.parse(text), again == value else {
            fatalError("JSON round trip changed the value: \(text)")
        }
    }
    return 0
}
