// The gateway's release version and the plugin ABI it speaks, for --version, /metrics and the start-up line.
internal import PluginABI

/// What this build is: shown by `gatehouse --version`, in the `listening` log line and as
/// `gatehouse_build_info` in `/metrics`, so an operator can tell which release answers.
public enum GatehouseVersion {
    /// The release version (semantic versioning); bumped when a release is cut.
    public static let release = "0.1.0"
    /// The plugin ABI this host speaks, `major.minor` (`gatehouse_plugin.h`).
    public static let pluginABI = "\(GATEHOUSE_ABI_MAJOR).\(GATEHOUSE_ABI_MINOR)"
    /// One line for `--version`.
    public static var description: String { "gatehouse \(release) (plugin ABI \(pluginABI))" }
}
