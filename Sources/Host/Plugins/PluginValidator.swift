// Offline validation of one plugin directory (for `gatehouse plugins validate`).
internal import Foundation
internal import PluginABI

/// Checks a plugin the way loading would, without calling its `init`.
public enum PluginValidator {
    /// Returns a one-line summary, or throws the first problem found.
    public static func validate(directory: String) throws -> String {
        let manifest = try PluginManifest.load(directory: directory)
        let loader = try PluginLoader()
        defer { loader.removePrivateCopies() }
        let library = try loader.open(manifest, pluginsDirectory: nil)
        let toolchain = library.descriptor.pointee.swift_toolchain.map { String(cString: $0) } ?? "C (no Swift toolchain)"
        return "\(manifest.name) \(manifest.version), ABI \(GATEHOUSE_ABI_MAJOR).\(library.descriptor.pointee.abi_minor), \(toolchain), sha256 \(library.sha256)"
    }
}
