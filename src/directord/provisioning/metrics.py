"""The provisioner's Prometheus metrics (prometheus_client; served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

COUNTERS = (
    ("discovered", "nodes seen announcing themselves for the first time"),
    ("provisioned", "nodes configured, restarted and seen joining the cluster"),
    ("deferred", "nodes a helper deferred (or whose helper failed) for the next cycle"),
    ("rejected", "nodes a helper rejected (kept out until `provisioner clear NAME`)"),
    ("refused", "announcements refused: wrong token, garbage, floods, name or machine clashes"),
    ("helper_errors", "helper runs that failed: non-zero exit, timeout, bad JSON"),
    ("rpc_errors", "requests to nodes that failed or timed out"),
)


class Metrics:
    """Every metric of one provisioner, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.counters = {
            name: Counter(f"directord_provisioner_{name}", text, registry=self.registry)
            for name, text in COUNTERS
        }
        self.helper_seconds = Histogram(
            "directord_provisioner_helper_seconds",
            "time a helper took for one node",
            registry=self.registry,
        )
        self.paused = Gauge(
            "directord_provisioner_paused", "1 while paused", registry=self.registry
        )
        self.busy_workers = Gauge(
            "directord_provisioner_busy_workers", "workers provisioning a node now",
            registry=self.registry,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "directord_provisioner_queue_depth", "nodes waiting for a worker",
            registry=self.registry,
        )  # fmt: skip

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name].inc(amount)

    def value(self, name: str) -> int:
        """A counter's value (status and tests)."""
        return int(self.counters[name]._value.get())

    def serve(self, port: int, address: str) -> None:
        """Serve /metrics on a thread of prometheus_client's."""
        start_http_server(port, addr=address, registry=self.registry)
