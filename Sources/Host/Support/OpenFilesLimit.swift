// Raises the process's open-files soft limit to its hard limit, as Go's runtime and nginx's worker_rlimit_nofile do.
#if canImport(Glibc)
internal import Glibc
#endif

/// Every client connection, upstream connection and plugin file is a descriptor; a service
/// manager's default soft limit (often 1024) would cap a gateway at a few hundred streams,
/// while the hard limit it also sets is usually far higher.
enum OpenFilesLimit {
    /// Sets the soft limit to the hard one (when lower) and returns the soft limit in force
    /// afterwards; nil if the limits cannot be read.
    static func raiseToHardLimit() -> UInt64? {
        var limits = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limits) == 0 else { return nil }
        if limits.rlim_cur < limits.rlim_max {
            var raised = limits
            raised.rlim_cur = limits.rlim_max
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { return UInt64(raised.rlim_cur) }
        }
        return UInt64(limits.rlim_cur)
    }

    /// Descriptors this process has open now (nil where `/proc/self/fd` cannot be read).
    static func openDescriptors() -> Int? {
        guard let directory = opendir("/proc/self/fd") else { return nil }
        defer { closedir(directory) }
        var count = 0
        while let entry = readdir(directory) {
            // "." and ".." are the only names not a descriptor's number.
            if entry.pointee.d_name.0 != 0x2E { count += 1 }
        }
        // Less the one opendir itself holds.
        return count - 1
    }

    /// Descriptors kept back from client connections for what else the process opens later (log
    /// reopening, certificate reloads, plugins' own files, DNS): an eighth of the limit, 16 to 64.
    static func reserve(limit: Int) -> Int { min(64, max(16, limit / 8)) }

    /// The default `server.max_connections`: half the descriptors left after start-up and the
    /// reserve, since a client connection may hold an upstream connection as well. At least 1.
    static func defaultClientConnections(limit: UInt64, openNow: Int) -> Int {
        let limit = Int(clamping: limit)
        let left = limit - openNow - reserve(limit: limit)
        return max(1, left / 2)
    }
}
