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
}
