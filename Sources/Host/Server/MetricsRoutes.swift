// GET /metrics: the Prometheus text exposition of gateway and plugin metrics.
internal import Hummingbird
internal import NIOCore

/// Serves `/metrics` (behind the API key when one is configured).
struct MetricsRoutes {
    let metrics: GatehouseMetrics

    func register(on router: Router<GatehouseRequestContext>) {
        router.get("/metrics") { _, _ in
            Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                body: .init(byteBuffer: ByteBuffer(bytes: metrics.render())))
        }
    }
}
