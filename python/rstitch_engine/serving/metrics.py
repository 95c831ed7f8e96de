"""Prometheus metrics of the server: vLLM's names under the prefix `rstitch:`, each with a `model_name`
label, plus the hybrid ones no other engine has (docs/serving.md, 'Metrics').

Observed in the step thread (AsyncEngine.listeners), for every request, whether its client is still
there: token counters per commit, by source; request counters and per-request histograms when a request
finishes (aborted ones included); gauges are read from the engine at scrape time.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..outputs import RequestOutput
from ..protocol import Model
from ..streaming import StreamOutput
from ..switching import catchup_tokens

PREFIX = "rstitch:"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0, 640.0)


class ServerMetrics:
    def __init__(self, model_name: str, online):
        self.registry = CollectorRegistry()
        label = {"model_name": model_name}

        def metric(kind, name, doc, labels=(), **kw):
            m = kind(PREFIX + name, doc, ["model_name", *labels], registry=self.registry, **kw)
            return m if labels else m.labels(**label)

        self.label = label
        self._last_commit: dict = {}  # request id -> time of its last commit with tokens (ITL)
        self.ttft = metric(Histogram, "time_to_first_token_seconds", "Time to the first token",
                           buckets=LATENCY_BUCKETS)
        self.itl = metric(Histogram, "inter_token_latency_seconds", "Time between committed tokens (per commit)",
                          buckets=LATENCY_BUCKETS)
        self.e2e = metric(Histogram, "e2e_request_latency_seconds", "Arrival to finish", buckets=LATENCY_BUCKETS)
        self.queue = metric(Histogram, "request_queue_time_seconds", "Arrival to the first scheduled step",
                            buckets=LATENCY_BUCKETS)
        for name, doc, read in (("num_requests_running", "Requests in the batch", lambda: online.num_running),
                                ("num_requests_waiting", "Requests waiting for admission", lambda: online.num_waiting),
                                ("kv_cache_usage_perc", "Fraction of KV blocks in use (0..1)",
                                 lambda: online.kv_cache_usage)):
            metric(Gauge, name, doc).set_function(read)
        self.prompt_tokens = metric(Counter, "prompt_tokens", "Prompt tokens of admitted requests")
        self.generation_tokens = metric(Counter, "generation_tokens", "Tokens sent to clients, by the model "
                                        "that produced them", labels=("source",))
        self.success = metric(Counter, "request_success", "Finished requests", labels=("finished_reason",))
        self.switches = metric(Counter, "model_switches", "Hand-overs between the models",
                               labels=("direction",))
        self.catchup = metric(Counter, "catchup_tokens", "Output positions a model fed in multi-token forwards (catch-up after a switch, verify)",
                              labels=("model",))
        self.discarded = metric(Counter, "discarded_slm_tokens", "SLM tokens discarded at a switch to the LLM")
        self.drafts = metric(Counter, "spec_decode_num_draft_tokens", "Speculative draft tokens")
        self.accepted = metric(Counter, "spec_decode_num_accepted_tokens", "Accepted speculative draft tokens")
        self.llm_wait = metric(Histogram, "llm_wait_seconds", "Time a request's rows waited, parked, for an LLM "
                               "batch to form (per finished request)", buckets=LATENCY_BUCKETS)
        self.llm_steps = metric(Counter, "llm_steps", "Steps the LLM ran (rate: LLM steps per second)")
        self.prefix_queries = metric(Counter, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                                     "at admission, per model", labels=("model",))
        self.prefix_hits = metric(Counter, "prefix_cache_hits", "Prompt tokens whose KV came from the prefix "
                                  "cache instead of being computed, per model", labels=("model",))
        self._models = [Model(m).name.lower() for m in online.engine.configs]
        self._online, self._llm_steps_seen = online, 0

    def observe(self, out: StreamOutput) -> None:
        steps = self._online.llm_steps
        if steps > self._llm_steps_seen:
            self.llm_steps.inc(steps - self._llm_steps_seen)
            self._llm_steps_seen = steps
        for source in (Model.SLM, Model.LLM):
            count = sum(1 for s in out.sources if s == source)
            if count:
                self.generation_tokens.labels(source=source.name.lower(), **self.label).inc(count)
        previous = self._last_commit.get(out.request_id)
        if out.token_ids:
            if previous is not None:
                self.itl.observe(out.time - previous)
            self._last_commit[out.request_id] = out.time
        if out.finished:
            self._last_commit.pop(out.request_id, None)
            self._finish(out.output)

    def _finish(self, output: RequestOutput) -> None:
        m, s = output.metrics, output.stats
        self.success.labels(finished_reason=output.finish_reason or "unknown", **self.label).inc()
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.e2e.observe(m["finished_time"] - m["arrival_time"])
        if "first_token_time" in m:
            self.ttft.observe(m["first_token_time"] - m["arrival_time"])
        if "first_scheduled_time" in m:
            self.queue.observe(m["first_scheduled_time"] - m["arrival_time"])
        if not s:
            return
        for direction, key in (("to_llm", "switches_to_llm"), ("to_slm", "switches_to_slm")):
            self.switches.labels(direction=direction, **self.label).inc(s[key])
        for model, count in catchup_tokens(output).items():
            self.catchup.labels(model=model.name.lower(), **self.label).inc(count)
        self.discarded.inc(s["discarded_slm_tokens"])
        self.drafts.inc(s["drafted"])
        self.accepted.inc(s["accepted"])
        self.llm_wait.observe(s["llm_wait_s"])
        for model in self._models:
            self.prefix_queries.labels(model=model, **self.label).inc(s["prefix_queries"])
            self.prefix_hits.labels(model=model, **self.label).inc(s[f"prefix_hits_{model}"])
