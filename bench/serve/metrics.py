"""The service's Prometheus metrics, in a registry of its own (one per service, so tests and several
services in one process do not share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# latency buckets from 1 ms to 30 s: a CPU decode step is milliseconds, a queued request seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServingMetrics:
    """Requests, queue depth, running sequences, tokens, latencies and KV-cache bytes."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("archbench_requests", "Requests answered, by outcome", ["status"], registry=r)
        self.queue_depth = Gauge("archbench_queue_depth", "Requests waiting to join the batch", registry=r)
        self.running = Gauge("archbench_running_sequences", "Sequences in the decoding batch", registry=r)
        self.max_batched = Gauge("archbench_max_batched_sequences", "The most sequences one decode step ran", registry=r)
        self.tokens_generated = Counter("archbench_tokens_generated", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram("archbench_time_to_first_token_seconds", "From arrival to the first token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("archbench_inter_token_latency_seconds", "Between a sequence's tokens",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.request_duration = Histogram("archbench_request_duration_seconds", "From arrival to the last token",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.kv_cache_bytes = Gauge("archbench_kv_cache_bytes", "Bytes the batch's KV cache holds", registry=r)
        self.kv_cache_bytes_peak = Gauge("archbench_kv_cache_bytes_peak", "The most bytes the KV cache has held", registry=r)

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
