// The gate before dlopen: file type, ownership, permissions, confinement and sha256 of a plugin library.
internal import Crypto
internal import Foundation
#if canImport(Glibc)
internal import Glibc
#endif

/// Why a plugin was not loaded: one line, shown in logs and in `GET /v1/plugins`.
public struct PluginLoadError: Error, Sendable, CustomStringConvertible {
    public let reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// A library's bytes, read once through a checked file descriptor and hashed.
struct VerifiedLibrary: Sendable {
    let sourcePath: String
    let bytes: Data
    let sha256: String
}

/// Checks a plugin library before anything of it runs. Constructors run inside `dlopen`, so
/// these checks (not anything the library says about itself) are the real gate.
enum PluginLibraryVerifier {
    /// Verifies `manifest.library` inside `manifest.directory` and returns its bytes.
    /// - Parameter pluginsDirectory: the drop-in directory; it must not be group/world-writable either.
    static func verify(_ manifest: PluginManifest, pluginsDirectory: String?) throws -> VerifiedLibrary {
        let directory = manifest.directory
        let path = (directory as NSString).appendingPathComponent(manifest.library)
        var parents = [directory]
        if let pluginsDirectory { parents.append(pluginsDirectory) }
        for parent in parents { try checkDirectory(parent, refusingLink: false) }

        var linkInfo = stat()
        guard lstat(path, &linkInfo) == 0 else {
            if errno == ENOENT { throw PluginLoadError("library \(manifest.library) not found in \(directory)") }
            throw PluginLoadError("cannot stat library \(path): \(errnoText())")
        }
        if (linkInfo.st_mode & S_IFMT) == S_IFLNK {
            throw PluginLoadError("library \(path) is a symbolic link; plugin libraries must be regular files")
        }
        guard let realDirectory = realpath(directory), let realLibrary = realpath(path) else {
            throw PluginLoadError("cannot resolve \(path): \(errnoText())")
        }
        if (linkInfo.st_mode & S_IFMT) == S_IFDIR {
            throw PluginLoadError("library \(manifest.library) is a directory, not a library file")
        }
        if !realLibrary.hasPrefix(realDirectory + "/") {
            throw PluginLoadError("library \(manifest.library) resolves to \(realLibrary), outside the plugin directory \(realDirectory)")
        }
        // The directories between the plugin's and the library (`lib/x86_64/libx.so`): whoever
        // may write one may swap the library in it.
        var subdirectory = directory
        for component in manifest.library.split(separator: "/").dropLast() {
            subdirectory = (subdirectory as NSString).appendingPathComponent(String(component))
            try checkDirectory(subdirectory, refusingLink: true)
        }
        let bytes = try readChecked(path, what: "library")

        let digest = SHA256.hash(data: bytes).map { byte in
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined()
        if let pinned = manifest.sha256, pinned != digest {
            throw PluginLoadError("sha256 mismatch for \(manifest.library): manifest pins \(pinned), file has \(digest)")
        }
        return VerifiedLibrary(sourcePath: path, bytes: bytes, sha256: digest)
    }

    /// The bytes of the regular file at `path`, checked (not a symbolic link, owner, mode) and
    /// read through one descriptor, so the file cannot be swapped in between.
    /// - Parameter what: the file's role in messages ("library", "manifest").
    static func readChecked(_ path: String, what: String) throws -> Data {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else {
            switch errno {
            case ELOOP: throw PluginLoadError("\(what) \(path) is a symbolic link; it must be a regular file")
            case ENOENT: throw PluginLoadError("\(what) \(path) not found")
            default: throw PluginLoadError("cannot open \(what) \(path): \(errnoText())")
            }
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw PluginLoadError("cannot stat \(what) \(path): \(errnoText())") }
        guard (info.st_mode & S_IFMT) == S_IFREG else { throw PluginLoadError("\(what) \(path) is not a regular file") }
        try checkOwnerAndMode(info, what: "\(what) \(path)")
        return try readAll(fd, size: Int(info.st_size), path: path)
    }

    /// Checks the directory at `path` as one holding a plugin: owner and mode; with
    /// `refusingLink`, not a symbolic link either (the plugin and plugins directories may be
    /// links; the sub-directories on a library's path may not).
    private static func checkDirectory(_ path: String, refusingLink: Bool) throws {
        var info = stat()
        guard (refusingLink ? lstat(path, &info) : stat(path, &info)) == 0 else { throw PluginLoadError("cannot stat \(path): \(errnoText())") }
        if refusingLink, (info.st_mode & S_IFMT) == S_IFLNK {
            throw PluginLoadError("directory \(path) is a symbolic link; the library's path must be real directories")
        }
        try checkOwnerAndMode(info, what: "directory \(path)")
    }

    private static func checkOwnerAndMode(_ info: stat, what: String) throws {
        let mode = info.st_mode & 0o7777
        if info.st_mode & (S_IWGRP | S_IWOTH) != 0 {
            throw PluginLoadError("\(what) is group- or world-writable (mode \(String(mode, radix: 8))); run chmod go-w on it")
        }
        if info.st_uid != 0 && info.st_uid != geteuid() {
            throw PluginLoadError("\(what) is owned by uid \(info.st_uid), not by root or the service user (uid \(geteuid()))")
        }
    }

    private static func readAll(_ fd: Int32, size: Int, path: String) throws -> Data {
        var data = Data(count: size)
        var offset = 0
        try data.withUnsafeMutableBytes { buffer in
            while offset < size {
                let count = read(fd, buffer.baseAddress! + offset, size - offset)
                if count < 0 && errno == EINTR { continue }
                guard count > 0 else { throw PluginLoadError("cannot read \(path): \(count == 0 ? "file shrank while reading" : errnoText())") }
                offset += count
            }
        }
        return data
    }
}

func errnoText() -> String { String(cString: strerror(errno)) }

private func realpath(_ path: String) -> String? {
    guard let resolved = Glibc.realpath(path, nil) else { return nil }
    defer { free(resolved) }
    return String(cString: resolved)
}
