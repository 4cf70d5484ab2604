#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The one place raw file system calls are made. Every failure becomes `FormatError.io` naming
/// the path and the operation; short reads are errors (a file that shrank under us is truncated).
public final class SystemFile: @unchecked Sendable {
    public let path: String
    public let descriptor: Int32
    /// What errors call the file: its path, or for a temporary the output it becomes.
    let label: String

    private init(path: String, descriptor: Int32, label: String? = nil) {
        self.path = path
        self.descriptor = descriptor
        self.label = label ?? path
    }

    deinit { close(descriptor) }

    public static func openForReading(_ path: String) throws(FormatError) -> SystemFile {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(path: path, operation: "open for reading", code: errno) }
        var info = stat()
        if fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR {
            close(fd)
            throw .io(path: path, operation: "read a directory as a file", code: EISDIR)
        }
        return SystemFile(path: path, descriptor: fd)
    }

    /// Creates a new file; fails if it exists (so two writers never share a temporary name).
    /// A temporary names its `destination`, so that errors speak of the output being written.
    public static func createExclusive(_ path: String, becoming destination: String? = nil) throws(FormatError) -> SystemFile {
        let label = destination.map { "\($0) (being written as \(path.split(separator: "/").last ?? ""))" } ?? path
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .io(path: label, operation: "create", code: errno) }
        return SystemFile(path: path, descriptor: fd, label: label)
    }

    public func size() throws(FormatError) -> Int {
        var info = stat()
        guard fstat(descriptor, &info) == 0 else { throw .io(path: label, operation: "stat", code: errno) }
        return Int(info.st_size)
    }

    /// Reads exactly `buffer.count` bytes at `offset`.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(FormatError) {
        var done = 0
        while done < buffer.count {
            let n = pread(descriptor, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw .io(path: label, operation: "read \(buffer.count) bytes at offset \(offset)", code: errno)
            }
            if n == 0 {
                throw .io(path: label, operation: "read \(buffer.count) bytes at offset \(offset) (unexpected end of file)", code: EIO)
            }
            done += n
        }
    }

    public func read(count: Int, at offset: Int) throws(FormatError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        if count == 0 { return bytes }
        try withMutableBytes(&bytes) { (buffer) throws(FormatError) in try read(into: buffer, at: offset) }
        return bytes
    }

    /// Writes all of `buffer` at `offset`.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws(FormatError) {
        var done = 0
        while done < buffer.count {
            let n = pwrite(descriptor, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw .io(path: label, operation: "write \(buffer.count) bytes at offset \(offset)", code: errno)
            }
            done += n
        }
    }

    public func truncate(to length: Int) throws(FormatError) {
        guard ftruncate(descriptor, off_t(length)) == 0 else { throw .io(path: label, operation: "set the file length", code: errno) }
    }

    public func synchronize() throws(FormatError) {
        guard fsync(descriptor) == 0 else { throw .io(path: label, operation: "flush to storage", code: errno) }
    }

    /// Tells the kernel we will not reread `length` bytes at `offset` soon, so a conversion
    /// of a 40 GB checkpoint does not push everything else out of the page cache.
    public func dropCache(offset: Int, length: Int) {
        FileSystem.dropCache(descriptor: descriptor, offset: offset, length: length)
    }
}

// The system calls that differ between Linux and macOS, for the runtime's expert reads.
extension FileSystem {
    /// A descriptor of `path` whose reads bypass the page cache, or nil where that cannot be had
    /// (the caller reads through the cache instead). Linux: O_DIRECT, which needs offsets,
    /// lengths and buffers aligned to the device's block size (bundles are 4096-aligned); Glibc's
    /// Swift overlay does not export it and its value differs by architecture. macOS: an ordinary
    /// descriptor with F_NOCACHE set, which has no alignment rule.
    public static func openUncached(_ path: String) -> Int32? {
        #if os(Linux)
        #if arch(x86_64)
        let direct: Int32 = 0o40000
        #elseif arch(arm64)
        let direct: Int32 = 0o200000
        #else
        return nil
        #endif
        let fd = open(path, O_RDONLY | O_CLOEXEC | direct)
        return fd >= 0 ? fd : nil
        #elseif canImport(Darwin)
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        guard fcntl(fd, F_NOCACHE, 1) == 0 else {
            close(fd)
            return nil
        }
        return fd
        #else
        return nil
        #endif
    }

    /// Drops `length` bytes at `offset` of an open file from the page cache (Linux's
    /// POSIX_FADV_DONTNEED; macOS has no posix_fadvise, and F_NOCACHE descriptors keep nothing).
    public static func dropCache(descriptor: Int32, offset: Int, length: Int) {
        #if os(Linux)
        _ = posix_fadvise(descriptor, off_t(offset), off_t(length), POSIX_FADV_DONTNEED)
        #endif
    }

    /// Asks for transparent huge pages on anonymous memory (Linux's MADV_HUGEPAGE: fewer TLB
    /// misses; macOS has no such advice and chooses page sizes itself).
    public static func adviseHugePages(_ pointer: UnsafeMutableRawPointer, count: Int) {
        #if os(Linux)
        _ = madvise(pointer, count, MADV_HUGEPAGE)
        #endif
    }
}

/// Writes text to standard error, unbuffered. The executables' one way to print diagnostics and
/// progress (the libraries themselves never print).
public func writeStandardError(_ text: String) {
    var bytes = Array(text.utf8)
    bytes.withUnsafeMutableBytes { raw in
        var offset = 0
        while offset < raw.count {
            let n = write(2, raw.baseAddress! + offset, raw.count - offset)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            offset += n
        }
    }
}

public enum FileSystem {
    public static func exists(_ path: String) -> Bool {
        var info = stat()
        return lstat(path, &info) == 0
    }

    public static func isDirectory(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR
    }

    public static func fileSize(_ path: String) throws(FormatError) -> Int {
        var info = stat()
        guard stat(path, &info) == 0 else { throw .io(path: path, operation: "stat", code: errno) }
        return Int(info.st_size)
    }

    /// The first `count` bytes of a file (fewer when it is shorter).
    public static func readPrefix(_ path: String, count: Int) throws(FormatError) -> [UInt8] {
        let file = try SystemFile.openForReading(path)
        return try file.read(count: min(count, try file.size()), at: 0)
    }

    public static func readAll(_ path: String, limit: Int) throws(FormatError) -> [UInt8] {
        let file = try SystemFile.openForReading(path)
        let size = try file.size()
        guard size <= limit else {
            throw .invalidRequest("\(path) is \(size) bytes; files of this kind are at most \(limit) bytes")
        }
        return try file.read(count: size, at: 0)
    }

    public static func rename(_ from: String, to: String) throws(FormatError) {
        guard Glibc.rename(from, to) == 0 else { throw .io(path: to, operation: "rename \(from) into place", code: errno) }
    }

    /// Writes `bytes` to a temporary file beside `path`, flushes it and renames it into place.
    public static func writeAtomically(_ bytes: [UInt8], to path: String) throws(FormatError) {
        let output = try AtomicOutput(path)
        try withBytes(bytes) { (raw) throws(FormatError) in try output.append(raw) }
        try output.commit()
    }

    public static func remove(_ path: String) {
        unlink(path)
    }

    /// The directory part of a path ("." for a bare name).
    public static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    public static func join(_ directory: String, _ name: String) -> String {
        directory.hasSuffix("/") ? directory + name : directory + "/" + name
    }

    /// A unique temporary path beside `path`, so that the final rename stays on one file system:
    /// `.NAME.PID.RANDOM.tmp`. Temporaries of `path` that a killed run left (their process is
    /// gone) are removed first, each reported on stderr.
    public static func temporaryPath(beside path: String) -> String {
        for name in removeAbandonedTemporaries(beside: path) {
            writeStandardError("note: removed \(name), left by an interrupted write of \(path)\n")
        }
        let directory = directory(of: path)
        return join(directory, ".\(baseName(of: path)).\(getpid()).\(UInt32.random(in: 0...UInt32.max)).tmp")
    }

    /// Removes the temporary files beside `path` whose writer no longer runs (a `kill -9`, a power
    /// cut) and returns their paths. A temporary whose process id is alive is left alone: it may
    /// be another writer's, still at work.
    @discardableResult
    public static func removeAbandonedTemporaries(beside path: String) -> [String] {
        let directory = directory(of: path)
        let prefix = ".\(baseName(of: path))."
        guard let stream = opendir(directory) else { return [] }
        defer { closedir(stream) }
        var removed: [String] = []
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard name.hasPrefix(prefix), name.hasSuffix(".tmp") else { continue }
            let middle = name.dropFirst(prefix.count).dropLast(4).split(separator: ".", omittingEmptySubsequences: false)
            guard middle.count == 2, let pid = Int32(middle[0]), pid > 0, UInt32(middle[1]) != nil else { continue }
            guard pid != getpid(), kill(pid, 0) != 0, errno == ESRCH else { continue }
            let full = join(directory, name)
            if unlink(full) == 0 { removed.append(full) }
        }
        return removed
    }

    private static func baseName(of path: String) -> String {
        path.split(separator: "/").last.map(String.init) ?? "output"
    }
}

/// This process's peak resident set, as the kernel measured it: VmHWM in /proc/self/status,
/// the high-water mark of this program's own address space. (getrusage's ru_maxrss is not: Linux
/// carries the parent's resident set at fork into it across exec, so a tool started by a large
/// process reports the parent's size. macOS has no /proc; there ru_maxrss, in bytes, is used.)
public func peakResidentBytes() -> Int {
    // /proc files report a size of 0: read to the end rather than by size.
    let fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC)
    if fd >= 0 {
        var status: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while status.count < 1 << 20 {
            let n = read(fd, &chunk, chunk.count)
            if n <= 0 { break }
            status += chunk[0..<n]
        }
        close(fd)
        for line in String(decoding: status, as: UTF8.self).split(separator: "\n") where line.hasPrefix("VmHWM:") {
            if let kib = Int(line.dropFirst(6).filter(\.isNumber)) { return kib * 1024 }
        }
    }
    var usage = rusage()
    #if canImport(Glibc)
    getrusage(Int32(RUSAGE_SELF.rawValue), &usage)
    return Int(usage.ru_maxrss) * 1024
    #else
    getrusage(RUSAGE_SELF, &usage)
    return Int(usage.ru_maxrss)
    #endif
}

/// An output written front to back into a temporary file beside its path, flushed and renamed
/// into place by `commit()`; dropped uncommitted (an error, an interrupt), it removes the
/// temporary, so the path holds the previous file or the whole new one, never a part.
public final class AtomicOutput {
    public let path: String
    private let temporary: String
    private let file: SystemFile
    private var length = 0
    private var committed = false

    public init(_ path: String) throws(FormatError) {
        self.path = path
        temporary = FileSystem.temporaryPath(beside: path)
        file = try SystemFile.createExclusive(temporary, becoming: path)
    }

    deinit { if !committed { FileSystem.remove(temporary) } }

    public func append(_ bytes: UnsafeRawBufferPointer) throws(FormatError) {
        try file.write(bytes, at: length)
        length += bytes.count
    }

    public func commit() throws(FormatError) {
        try file.synchronize()
        try FileSystem.rename(temporary, to: path)
        committed = true
    }
}

/// A read-only memory map of a whole file.
public final class MappedFile: @unchecked Sendable {
    public let path: String
    public let bytes: UnsafeRawBufferPointer

    public init(path: String) throws(FormatError) {
        let file = try SystemFile.openForReading(path)
        let size = try file.size()
        self.path = path
        if size == 0 {
            bytes = UnsafeRawBufferPointer(start: nil, count: 0)
            return
        }
        let base = try MappedFile.map(file.descriptor, size: size, path: path)
        bytes = UnsafeRawBufferPointer(start: base, count: size)
    }

    private static let hugePage = 2 << 20

    /// Maps the file at a 2 MiB-aligned address and, on Linux, asks for huge pages: where the page
    /// cache holds the file in 2 MiB folios (as `PackageWriter` writes it, and as faults read it
    /// back in with this advice) each one is mapped by a single TLB entry instead of 512.
    private static func map(_ descriptor: Int32, size: Int, path: String) throws(FormatError) -> UnsafeRawPointer {
        #if os(Linux)
        if size >= hugePage,
            let reserved = mmap(nil, size + hugePage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
            reserved != MAP_FAILED
        {
            let start = UInt(bitPattern: reserved)
            let aligned = (start + UInt(hugePage) - 1) / UInt(hugePage) * UInt(hugePage)
            let page = UInt(sysconf(Int32(_SC_PAGESIZE)))
            let end = (aligned + UInt(size) + page - 1) / page * page
            let at = UnsafeMutableRawPointer(bitPattern: aligned)
            if let mapped = mmap(at, size, PROT_READ, MAP_SHARED | MAP_FIXED, descriptor, 0), mapped != MAP_FAILED {
                if aligned > start { munmap(reserved, Int(aligned - start)) }
                if start + UInt(size + hugePage) > end {
                    munmap(UnsafeMutableRawPointer(bitPattern: end), Int(start + UInt(size + hugePage) - end))
                }
                _ = madvise(mapped, size, MADV_HUGEPAGE)
                return UnsafeRawPointer(mapped)
            }
            munmap(reserved, size + hugePage)
        }
        #endif
        guard let base = mmap(nil, size, PROT_READ, MAP_SHARED, descriptor, 0), base != MAP_FAILED else {
            throw .io(path: path, operation: "memory-map \(size) bytes", code: errno)
        }
        return UnsafeRawPointer(base)
    }

    /// Asks for `range` (rounded out to whole pages) to be mapped with small pages only: for data
    /// read a little at a time, or copied elsewhere once, where a 2 MiB mapping would make a
    /// whole huge folio resident for one row.
    public func adviseSmallPages(_ range: UnsafeRawBufferPointer) {
        #if os(Linux)
        guard let start = range.baseAddress, range.count > 0 else { return }
        let page = UInt(sysconf(Int32(_SC_PAGESIZE)))
        let first = UInt(bitPattern: start) / page * page
        let end = (UInt(bitPattern: start) + UInt(range.count) + page - 1) / page * page
        guard let pointer = UnsafeMutableRawPointer(bitPattern: first) else { return }
        _ = madvise(pointer, Int(end - first), MADV_NOHUGEPAGE)
        #endif
    }

    /// Drops the pages wholly inside `range` from this process's resident set (they stay in the
    /// page cache and fault back in if read again): for data copied elsewhere after loading.
    public func release(_ range: UnsafeRawBufferPointer) {
        guard let start = range.baseAddress, range.count > 0 else { return }
        let page = UInt(sysconf(Int32(_SC_PAGESIZE)))
        let first = (UInt(bitPattern: start) + page - 1) / page * page
        let end = (UInt(bitPattern: start) + UInt(range.count)) / page * page
        guard end > first, let pointer = UnsafeMutableRawPointer(bitPattern: first) else { return }
        _ = madvise(pointer, Int(end - first), MADV_DONTNEED)
    }

    deinit {
        if let base = bytes.baseAddress { munmap(UnsafeMutableRawPointer(mutating: base), bytes.count) }
    }
}

/// `withUnsafeBytes` for bodies with typed throws (the standard library's version is `rethrows`,
/// which erases the error type).
@inline(__always)
func withBytes<R>(_ bytes: [UInt8], _ body: (UnsafeRawBufferPointer) throws(FormatError) -> R) throws(FormatError) -> R {
    let result: Result<R, FormatError> = bytes.withUnsafeBytes { raw in
        do throws(FormatError) { return .success(try body(raw)) } catch { return .failure(error) }
    }
    return try result.get()
}

@inline(__always)
func withMutableBytes<R>(_ bytes: inout [UInt8], _ body: (UnsafeMutableRawBufferPointer) throws(FormatError) -> R) throws(FormatError) -> R
{
    let result: Result<R, FormatError> = bytes.withUnsafeMutableBytes { raw in
        do throws(FormatError) { return .success(try body(raw)) } catch { return .failure(error) }
    }
    return try result.get()
}
