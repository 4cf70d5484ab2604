// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "smallthinker",
    products: [
        .executable(name: "stconvert", targets: ["stconvert"]),
        .executable(name: "stquant", targets: ["stquant"]),
        .executable(name: "strun", targets: ["strun"]),
        .library(name: "Format", targets: ["Format"]),
        .library(name: "Engine", targets: ["Engine"])
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0")
    ],
    targets: [
        // zlib, for CRC-32 (Debian: zlib1g-dev).
        .systemLibrary(
            name: "CZlib",
            pkgConfig: "zlib",
            providers: [.apt(["zlib1g-dev"])]
        ),
        // ggml's Q4_0 quantiser in C (clang vectorises it), for the converter and stquant.
        .target(name: "CQuantize", cSettings: [.unsafeFlags(["-O3"])]),
        // File formats and codecs. Never imports Engine or the runtime's kernels.
        .target(name: "Format", dependencies: ["CZlib", "CQuantize"]),
        // The runtime's kernels in C, one file per operation family: per-function target
        // attributes let one binary carry portable, AVX2 and AVX-512 VNNI versions and pick at
        // run time (Swift has no per-function targets).
        .target(name: "CKernels", cSettings: [.unsafeFlags(["-O3"])]),
        // The runtime.
        .target(name: "Engine", dependencies: ["Format", "CKernels"]),
        .executableTarget(
            name: "stconvert",
            dependencies: ["Format", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .executableTarget(
            name: "stquant",
            dependencies: ["Format", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .executableTarget(
            name: "strun",
            dependencies: ["Format", "Engine", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .testTarget(name: "FormatTests", dependencies: ["Format"]),
        .testTarget(name: "EngineTests", dependencies: ["Engine"]),
        .testTarget(
            name: "ToolTests",
            dependencies: ["Format", "stconvert", "stquant", "strun"]
        )
    ]
)
