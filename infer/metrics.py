"""Prometheus metrics of the batching engine, served by `infer.serve` at GET /metrics.

Each engine has its own registry (several apps may live in one process, as in the tests).
Gauges are read from the engine when scraped; histograms are observed by its thread.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class EngineMetrics:
    """The engine's counters and histograms, plus gauges that call back into `stats()`."""

    def __init__(self, stats):
        """stats: a function returning a dict with waiting, running, blocks_used, blocks_total."""
        self.registry = CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str, field: str) -> None:
            Gauge(name, doc, registry=r).set_function(lambda: stats()[field])

        gauge("jaxlm_queue_length", "Requests waiting for a batch slot.", "waiting")
        gauge("jaxlm_running_sequences", "Sequences in the running batch.", "running")
        gauge("jaxlm_kv_blocks_used", "KV-cache blocks held by sequences.", "blocks_used")
        gauge("jaxlm_kv_blocks_total", "KV-cache blocks that can be handed out.", "blocks_total")
        self.ttft = Histogram(
            "jaxlm_time_to_first_token_seconds",
            "From submission to the first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "jaxlm_time_per_output_token_seconds",
            "Between two consecutive tokens of one sequence.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "jaxlm_requests_finished", "Finished sequences by reason.", ["reason"], registry=r
        )
        self.prompt_tokens = Counter("jaxlm_prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.generated_tokens = Counter("jaxlm_generation_tokens", "Tokens generated.", registry=r)
        self.prefix_hit_tokens = Counter(
            "jaxlm_prefix_cache_hit_tokens", "Prompt tokens served by the prefix cache.", registry=r
        )
        self.preemptions = Counter(
            "jaxlm_preemptions", "Sequences pushed back to the queue for blocks.", registry=r
        )

    def render(self) -> tuple[bytes, str]:
        """(the text exposition, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
