"""The server's Prometheus metrics (GET /metrics, text format), one registry per server.

    paligemma_requests_total{endpoint="chat", outcome="ok"}       ok | client_error | rejected |
                                                                   cancelled | server_error
    paligemma_queue_depth, paligemma_active_slots, paligemma_slots     read from the engine on scrape
    paligemma_generated_tokens_total
    paligemma_time_to_first_token_seconds_bucket{le="0.1"} ...    from submission to the first token
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

OUTCOMES = ("ok", "client_error", "rejected", "cancelled", "server_error")
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters the request handlers update, and gauges read from `engine.stats()`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("paligemma_requests", "HTTP requests by endpoint and outcome",
                                ("endpoint", "outcome"), registry=registry)
        self.tokens = Counter("paligemma_generated_tokens", "tokens generated for clients", registry=registry)
        self.ttft = Histogram("paligemma_time_to_first_token_seconds", "submission to first token",
                              buckets=TTFT_BUCKETS, registry=registry)
        for name, key, doc in (("paligemma_queue_depth", "queued", "requests waiting for a slot"),
                               ("paligemma_active_slots", "active", "slots generating now"),
                               ("paligemma_slots", "slots", "slots of the engine")):
            Gauge(name, doc, registry=registry).set_function(lambda key=key: engine.stats()[key])

    def count(self, endpoint, outcome):
        self.requests.labels(endpoint, outcome).inc()

    def render(self):
        return generate_latest(self.registry)
