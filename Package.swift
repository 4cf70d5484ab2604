// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "smallthinker",
    products: [
        .executable(name: "stconvert", targets: ["stconvert"]),
        .executable(name: "stquant", targets: ["stquant"]),
        .executable(name: "strun", targets: ["strun"]),
        .library(name: "Format", targets: ["Format"]),
        .library(name: "Engine", targets: ["Engine"]),
        .library(name: "OpenAICompatible", targets: ["OpenAICompatible"]),
        .library(name: "Server", targets: ["Server"])
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // strun serve: Hummingbird 2 (HTTP/1.1 on SwiftNIO, with swift-service-lifecycle's graceful
        // shutdown on SIGINT/SIGTERM), without its swift-configuration and full-Foundation traits.
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1", traits: []),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1")
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
        // The OpenAI-compatible API as values: requests parsed and checked into the engine's
        // GenerationRequest, responses and stream chunks as JSON. No HTTP, so the fuzzer can reach it.
        .target(name: "OpenAICompatible", dependencies: ["Format", "Engine"]),
        // strun serve's HTTP server: routes, server-sent events, API keys, metrics, shutdown. Talks to
        // the model only through Engine's BatchGenerator.
        .target(
            name: "Server",
            dependencies: [
                "OpenAICompatible", "Engine",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Prometheus", package: "swift-prometheus")
            ]
        ),
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
            dependencies: ["Format", "Engine", "Server", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .testTarget(name: "FormatTests", dependencies: ["Format"]),
        .testTarget(name: "EngineTests", dependencies: ["Engine"]),
        .testTarget(name: "ServerTests", dependencies: ["OpenAICompatible", "Server", "Engine", "Format"]),
        .testTarget(
            name: "ToolTests",
            dependencies: ["Format", "stconvert", "stquant", "strun"]
        )
    ]
)
