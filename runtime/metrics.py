"""Prometheus metrics of a serving engine (what vLLM exports, under amxc_ names).

Latency histograms are observed by the engine thread as tokens and requests finish; the state of
the scheduler (requests running and waiting, KV-cache usage, prefix-cache and token counters,
preemptions) is read when /metrics is scraped, by a collector, so nothing is kept twice.  Each
service has its own registry: two servers in one process (tests) never share series."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds; first-token and end-to-end buckets reach minutes (long prompts on 2 cores)
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80, 160, 640)
_ITL = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5, 10)
_E2E = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280)


class ServerMetrics:
    def __init__(self, scheduler):
        self.registry = CollectorRegistry()
        self.ttft = Histogram("amxc_time_to_first_token_seconds", "Queueing to first generated token",
                              buckets=_TTFT, registry=self.registry)
        self.itl = Histogram("amxc_inter_token_latency_seconds", "Between successive tokens of a request",
                             buckets=_ITL, registry=self.registry)
        self.e2e = Histogram("amxc_e2e_request_latency_seconds", "Queueing to the request's end",
                             buckets=_E2E, registry=self.registry)
        self.finished = Counter("amxc_requests_finished", "Requests ended, by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.rejected = Counter("amxc_requests_rejected", "Requests refused before queueing, by reason",
                                ["reason"], registry=self.registry)
        self.registry.register(_SchedulerCollector(scheduler))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SchedulerCollector:
    def __init__(self, scheduler):
        self.scheduler = scheduler

    def collect(self):
        s, b = self.scheduler, self.scheduler.blocks
        yield GaugeMetricFamily("amxc_requests_running", "Requests in the running batch", value=len(s.running))
        yield GaugeMetricFamily("amxc_requests_waiting", "Requests queued for admission", value=len(s.waiting))
        yield GaugeMetricFamily("amxc_kv_cache_usage_ratio", "Fraction of KV-cache blocks held by requests",
                                value=b.usage)
        yield GaugeMetricFamily("amxc_kv_cache_blocks", "KV-cache blocks in all", value=b.num_blocks)
        yield GaugeMetricFamily("amxc_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up",
                                value=b.stats.hit_rate)
        for name, doc, value in (
                ("amxc_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
                 b.stats.lookup_tokens),
                ("amxc_prefix_cache_hit_tokens", "Prompt tokens the prefix cache supplied", b.stats.hit_tokens),
                ("amxc_preemptions", "Requests preempted for KV-cache room (recomputed later)",
                 s.stats.preemptions),
                ("amxc_prompt_tokens", "Prompt tokens admitted", s.stats.prompt_tokens),
                ("amxc_generation_tokens", "Tokens generated", s.stats.generated_tokens),
                ("amxc_spec_decode_draft_tokens", "Speculative decoding: tokens drafted", s.stats.drafted_tokens),
                ("amxc_spec_decode_accepted_tokens", "Speculative decoding: drafted tokens accepted",
                 s.stats.accepted_tokens)):
            yield CounterMetricFamily(name, doc, value=value)
