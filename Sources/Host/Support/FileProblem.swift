// What is wrong with a file the configuration names, said the way an operator fixes it.
internal import Foundation

enum FileProblem {
    /// What is wrong with the file at `path` itself (missing, a directory, unreadable), if
    /// anything: libraries' errors for it are bare names (NIOSSL's `failedToLoadCertificate`)
    /// or say nothing of the cause.
    static func of(_ path: String) -> String? {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else { return "no such file" }
        if isDirectory.boolValue { return "it is a directory" }
        guard FileManager.default.isReadableFile(atPath: path) else { return "not readable by this user" }
        return nil
    }
}
