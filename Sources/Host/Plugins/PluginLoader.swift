// dlopen of verified plugin bytes from a private copy, and the checks on what the library exports.
internal import Foundation
internal import PluginABI
#if canImport(Glibc)
internal import Glibc
#endif

/// A library opened and checked, not yet initialised.
struct OpenedLibrary: @unchecked Sendable {
    let handle: UnsafeMutableRawPointer
    let descriptor: UnsafePointer<gh_plugin_descriptor>
    let sha256: String
    /// The private copy that was opened (never the watched path).
    let privatePath: String
}

/// Opens plugin libraries. Never loads from the watched path: `dlopen` of an already-loaded path
/// returns the old handle, and overwriting a loaded file crashes the process. So verified bytes
/// are copied to a private, content-named file first (DESIGN.md, "Loading and hot reload").
final class PluginLoader: Sendable {
    /// Private directory (mode 0700) holding the content-named copies.
    let privateDirectory: String

    /// The ABI majors the host knows to look for when the v1 symbol is missing.
    private static let otherMajorsToReport = [0, 2, 3, 4, 5]

    init() throws {
        let base = ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        var template = Array("\(base)/gatehouse-libs-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else {
            throw PluginLoadError("cannot create a private directory for plugin libraries under \(base): \(errnoText())")
        }
        privateDirectory = String(cString: made)
    }

    /// Removes the private copies. Loaded libraries stay mapped; only the names go.
    func removePrivateCopies() {
        try? FileManager.default.removeItem(atPath: privateDirectory)
    }

    /// Checks the manifest against this host, verifies the library, copies and opens it, and
    /// checks its descriptor. Does not call `init`.
    func open(_ manifest: PluginManifest, pluginsDirectory: String?) throws -> OpenedLibrary {
        if manifest.abi != Int(GATEHOUSE_ABI_MAJOR) {
            throw PluginLoadError("manifest declares abi \(manifest.abi); this host speaks ABI \(GATEHOUSE_ABI_MAJOR)")
        }
        if let toolchain = manifest.toolchain, toolchain != hostSwiftToolchain {
            throw PluginLoadError(
                "built with \(toolchain) but this host runs \(hostSwiftToolchain); Swift has no stable ABI on Linux, rebuild the plugin with the host's toolchain")
        }
        let library = try PluginLibraryVerifier.verify(manifest, pluginsDirectory: pluginsDirectory)
        let privatePath = try privateCopy(of: library, name: manifest.name)

        // RTLD_NODELETE: a Swift library must never be unmapped (the runtime keeps pointers into it).
        guard let handle = dlopen(privatePath, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE) else {
            let reason = dlerror().map { String(cString: $0) } ?? "unknown error"
            throw PluginLoadError("dlopen failed: \(reason.replacingOccurrences(of: privatePath, with: manifest.library))")
        }
        guard let entry = dlsym(handle, GATEHOUSE_PLUGIN_ENTRY_NAME) else {
            for major in Self.otherMajorsToReport where dlsym(handle, "gatehouse_plugin_entry_v\(major)") != nil {
                throw PluginLoadError("library exports gatehouse_plugin_entry_v\(major) (ABI \(major)); this host speaks ABI \(GATEHOUSE_ABI_MAJOR)")
            }
            throw PluginLoadError("library does not export \(GATEHOUSE_PLUGIN_ENTRY_NAME); is it a Gatehouse plugin?")
        }
        let entryFunction = unsafeBitCast(entry, to: gh_plugin_entry_fn.self)
        guard let descriptor = entryFunction() else {
            throw PluginLoadError("\(GATEHOUSE_PLUGIN_ENTRY_NAME) returned no descriptor")
        }
        try check(descriptor.pointee, against: manifest)
        return OpenedLibrary(handle: handle, descriptor: descriptor, sha256: library.sha256, privatePath: privatePath)
    }

    private func check(_ descriptor: gh_plugin_descriptor, against manifest: PluginManifest) throws {
        // ABI 1.0's descriptor ends with `shutdown`; later minors may append fields, and a
        // plugin built against 1.0 must still load then.
        let minimumSize = MemoryLayout<gh_plugin_descriptor>.offset(of: \gh_plugin_descriptor.shutdown)! + MemoryLayout<gh_shutdown_fn>.size
        if Int(descriptor.struct_size) < minimumSize {
            throw PluginLoadError("descriptor struct_size \(descriptor.struct_size) is smaller than ABI 1's \(minimumSize)")
        }
        if descriptor.abi_major != GATEHOUSE_ABI_MAJOR {
            throw PluginLoadError("descriptor declares ABI \(descriptor.abi_major); this host speaks ABI \(GATEHOUSE_ABI_MAJOR)")
        }
        let name = descriptor.name.map { String(cString: $0) } ?? ""
        let version = descriptor.version.map { String(cString: $0) } ?? ""
        if name != manifest.name {
            throw PluginLoadError("library calls itself \"\(name)\" but the manifest says \"\(manifest.name)\"")
        }
        if version != manifest.version {
            throw PluginLoadError("library is version \"\(version)\" but the manifest says \"\(manifest.version)\"")
        }
        if let toolchain = descriptor.swift_toolchain.map({ String(cString: $0) }), toolchain != hostSwiftToolchain {
            throw PluginLoadError(
                "library was compiled with \(toolchain) but this host runs \(hostSwiftToolchain); rebuild the plugin with the host's toolchain")
        }
        if descriptor.`init` == nil || descriptor.handle == nil || descriptor.shutdown == nil {
            throw PluginLoadError("descriptor is missing init, handle or shutdown")
        }
    }

    /// Writes the bytes to `<private dir>/<sha256>-<name>.so` (reused if it already exists:
    /// same name, same content).
    private func privateCopy(of library: VerifiedLibrary, name: String) throws -> String {
        let path = "\(privateDirectory)/\(library.sha256.prefix(32))-\(name).so"
        if FileManager.default.fileExists(atPath: path) { return path }
        let temporary = path + ".partial"
        guard FileManager.default.createFile(atPath: temporary, contents: library.bytes, attributes: [.posixPermissions: 0o500]) else {
            throw PluginLoadError("cannot write private copy \(temporary): \(errnoText())")
        }
        guard rename(temporary, path) == 0 else { throw PluginLoadError("cannot rename private copy into place: \(errnoText())") }
        return path
    }
}

/// The Swift toolchain this host was compiled with; Swift plugins must match it exactly.
/// Mirrors `swiftToolchain` in PluginKit. Extend when toolchains change.
public let hostSwiftToolchain: String = {
    #if compiler(>=6.4)
    return "swift-6.4-or-newer"
    #elseif compiler(>=6.3.1)
    return "swift-6.3.1"
    #elseif compiler(>=6.3)
    return "swift-6.3.0"
    #else
    return "swift-older-than-6.3"
    #endif
}()
