// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "smallthinker",
    products: [
        .executable(name: "stconvert", targets: ["stconvert"]),
        .executable(name: "stquant", targets: ["stquant"]),
        .executable(name: "strun", targets: ["strun"]),
        .library(name: "Format", targets: ["Format"]),
        .library(name: "Engine", targets: ["Engine"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // zlib, for CRC-32 (Debian: zlib1g-dev).
        .systemLibrary(
            name: "CZlib",
            pkgConfig: "zlib",
            providers: [.apt(["zlib1g-dev"])]
        ),
        // File formats and codecs. Never imports Engine; the Q4_0 quantiser is in CKernels.
        .target(name: "Format", dependencies: ["CZlib", "CKernels"]),
        // Row kernels in C: per-function target attributes let one binary carry portable, AVX2
        // and AVX-512 VNNI versions and pick at run time (Swift has no per-function targets).
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
        ),
    ]
)
