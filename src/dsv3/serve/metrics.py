"""Prometheus metrics with vLLM's names under a `dsv3:` prefix, so existing dashboards carry over.

Engine state (queue lengths, cache usage, prefix-cache and token counters) is read at scrape time
by a collector, so it is never stale; latencies are histograms observed by the request handlers.
Each app owns its own registry (several servers can live in one test process).
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # `_created` series only add noise to dashboards

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0)


class _EngineCollector:
    """Reads the live engine (and response cache) each scrape."""

    def __init__(self, state: Callable[[], Any]):
        self.state = state

    def collect(self):
        st = self.state()
        engine = getattr(st, "engine", None)
        cache = getattr(st, "cache", None)
        if engine is not None:
            sched, bm = engine.scheduler, engine.block_manager
            yield GaugeMetricFamily("dsv3:num_requests_running", "Sequences in the running batch", value=len(sched.running))
            yield GaugeMetricFamily("dsv3:num_requests_waiting", "Sequences waiting to be scheduled", value=len(sched.waiting))
            yield GaugeMetricFamily("dsv3:kv_cache_usage_perc", "Fraction of latent-cache blocks in use (0-1)", value=float(bm.usage))
            yield CounterMetricFamily("dsv3:prefix_cache_queries", "Prompt blocks looked up in the prefix cache",
                                      value=getattr(bm, "prefix_queries", 0))
            yield CounterMetricFamily("dsv3:prefix_cache_hits", "Prompt blocks found in the prefix cache",
                                      value=getattr(bm, "prefix_hits", 0))
            yield CounterMetricFamily("dsv3:num_preemptions", "Sequences preempted for lack of cache blocks",
                                      value=getattr(sched, "num_preemptions", 0))
            yield CounterMetricFamily("dsv3:prompt_tokens", "Prompt tokens accepted", value=engine.stats.get("prompt_tokens", 0))
            yield CounterMetricFamily("dsv3:generation_tokens", "Tokens generated",
                                      value=engine.stats.get("generation_tokens", 0))
            yield CounterMetricFamily("dsv3:request_errors", "Requests the engine stopped after an internal error "
                                      "(each isolated: other requests carried on)", value=engine.stats.get("request_errors", 0))
            if "spec_accepted_tokens" in engine.stats:
                yield CounterMetricFamily("dsv3:spec_decode_num_accepted_tokens", "Speculative tokens accepted",
                                          value=engine.stats["spec_accepted_tokens"])
                yield CounterMetricFamily("dsv3:spec_decode_num_draft_tokens", "Speculative tokens proposed",
                                          value=engine.stats.get("spec_draft_tokens", 0))
                drafter = engine.drafter
                yield GaugeMetricFamily("dsv3:spec_decode_num_drafting_requests", "Running requests that draft "
                                        f"{drafter.k} token(s) per step (the others' acceptance fell below the break-even "
                                        "and they draft none)", value=sum(not s.spec_off for s in sched.running))
                yield CounterMetricFamily("dsv3:spec_decode_requests_switched_off", "Requests that stopped drafting: "
                                          "acceptance below spec_min_acceptance", value=drafter.switched_off)
        if cache is not None:
            yield CounterMetricFamily("dsv3:response_cache_queries", "Deterministic requests looked up in the response cache",
                                      value=cache.hits + cache.misses)
            yield CounterMetricFamily("dsv3:response_cache_hits", "Requests answered from the response cache", value=cache.hits)
            yield GaugeMetricFamily("dsv3:response_cache_hit_rate", "Response-cache hits / queries", value=cache.hit_rate)


class Metrics:
    def __init__(self, state: Callable[[], Any]):
        self.registry = r = CollectorRegistry()
        r.register(_EngineCollector(state))
        self.requests = Counter("dsv3:request", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.finished = Counter("dsv3:request_success", "Finished generations by finish reason", ["finished_reason"], registry=r)
        self.ttft = Histogram("dsv3:time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dsv3:inter_token_latency_seconds", "Time between streamed tokens", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("dsv3:e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
