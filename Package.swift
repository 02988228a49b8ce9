// swift-tools-version:6.1
// Gatehouse: an OpenAI-compatible LLM gateway with a native (.so) plugin host.
import PackageDescription

/// Every plugin library is linked with an export list (only the ABI entry symbol is dynamic)
/// and -Bsymbolic, so its own copies of shared packages never bind to the host's (DESIGN.md).
let pluginLinkerSettings: [LinkerSetting] = [
    .unsafeFlags([
        "-Xlinker", "--version-script=\(Context.packageDirectory)/Plugins/plugin-exports.map",
        "-Xlinker", "-Bsymbolic",
        "-Xlinker", "-z", "-Xlinker", "nodelete",
    ])
]

let strictSwift: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("InternalImportsByDefault"),
]

let package = Package(
    name: "gatehouse",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "gatehouse", targets: ["gatehouse"]),
        .library(name: "Host", targets: ["Host"]),
        .library(name: "PluginKit", targets: ["PluginKit"]),
        .library(name: "EchoPlugin", type: .dynamic, targets: ["Echo"]),
        // Built for the integration tests only (loaded from a temporary plugins.d).
        .library(name: "ServicesTestPlugin", type: .dynamic, targets: ["ServicesTestPlugin"]),
    ],
    dependencies: [
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", exact: "2.28.1"),
        .package(url: "https://github.com/swift-server/async-http-client.git", exact: "1.37.0"),
        .package(url: "https://github.com/jpsim/Yams.git", exact: "6.2.2"),
        .package(url: "https://github.com/apple/swift-log.git", exact: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", exact: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", exact: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", exact: "2.13.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", exact: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", exact: "4.5.2"),
        .package(url: "https://github.com/apple/swift-nio.git", exact: "2.101.3"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", exact: "2.37.6"),
        .package(url: "https://github.com/apple/swift-nio-extras.git", exact: "1.35.2"),
        .package(url: "https://github.com/apple/swift-http-types.git", exact: "1.8.0"),
    ],
    targets: [
        // The whole plugin ABI: one C header, no dependencies.
        .target(name: "PluginABI", path: "Sources/PluginABI"),
        // C library functions Swift's Glibc module hides (memmem).
        .target(name: "CSupport", path: "Sources/CSupport"),
        // Swift SDK for plugin authors.
        .target(name: "PluginKit", dependencies: ["PluginABI"], swiftSettings: strictSwift),
        // The server as a library.
        .target(
            name: "Host",
            dependencies: [
                "PluginABI",
                "CSupport",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOHTTPTypes", package: "swift-nio-extras"),
                .product(name: "NIOHTTPTypesHTTP1", package: "swift-nio-extras"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
            ],
            swiftSettings: strictSwift
        ),
        .executableTarget(
            name: "gatehouse",
            dependencies: [
                "Host",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strictSwift
        ),
        .target(
            name: "Echo",
            dependencies: ["PluginKit"],
            path: "Plugins/Echo",
            swiftSettings: strictSwift,
            linkerSettings: pluginLinkerSettings
        ),
        .target(
            name: "ServicesTestPlugin",
            dependencies: ["PluginKit"],
            path: "Tests/Plugins/ServicesTestPlugin",
            swiftSettings: strictSwift,
            linkerSettings: pluginLinkerSettings
        ),
        .testTarget(
            name: "HostTests",
            dependencies: [
                "Host", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"), .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strictSwift
        ),
    ]
)
