// The opaque handles plugins are given for live requests and middleware calls: random tokens, never addresses or counters.

/// A `gh_exchange*` or `gh_mw_call*` is a token into a table of live ones, never an object's
/// address (so a stale handle cannot reach freed memory) and never a counter: with counters, a
/// plugin bug that passes a neighbouring or made-up handle (its previous one plus one, a small
/// integer) answered another live request, its own or another plugin's. A random 64-bit token
/// is found by no such mistake, which then gets `GH_ERR_STATE`.
enum PluginHandleToken {
    /// A fresh token, non-zero (a NULL handle is refused before any lookup) and not live.
    static func make(isLive: (UInt) -> Bool) -> UInt {
        while true {
            let token = UInt.random(in: 1...UInt.max)
            if !isLive(token) { return token }
        }
    }
}
