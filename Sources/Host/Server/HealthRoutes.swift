// Liveness and readiness endpoints; exempt from authentication.
internal import Hummingbird

/// `/health` and `/health/live` (the upstream-dependent `/health/ready` is in GatewayRoutes).
struct HealthRoutes {
    func register(on router: Router<GatehouseRequestContext>) {
        router.get("/health") { _, _ in
            try Response.json(object: ["status": "ok"])
        }
        router.get("/health/live") { _, _ in
            try Response.json(object: ["status": "ok"])
        }
    }
}
