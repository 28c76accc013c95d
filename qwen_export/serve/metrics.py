"""The server's Prometheus metrics, in the text exposition format (version 0.0.4), written by hand:
no client library needed. Every update takes one lock (the worker thread and the event loop both
update them)."""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter

__all__ = ["Histogram", "Metrics"]

PREFIX = "qwen_export"
#: seconds: time to first token (queueing included) and the whole request
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: seconds per output token
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms are exposed."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip((*self.buckets, math.inf), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        out += [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]
        return out


class Metrics:
    """Requests by endpoint and status, tokens, queue depth, running requests, TTFT and latency."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.cancelled = 0
        self.queue_depth = 0
        self.running = 0
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From the request's arrival to its first token (queueing and prefill included).",
            LATENCY_BUCKETS,
        )
        self.per_token = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Mean decode time per output token after the first, one observation per request.",
            TOKEN_BUCKETS,
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds", "From the request's arrival to its last token.", LATENCY_BUCKETS
        )

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def set_queue(self, waiting: int, running: int) -> None:
        with self._lock:
            self.queue_depth, self.running = waiting, running

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def finished(
        self, prompt: int, completion: int, cached: int, decode_s: float, total_s: float, cancelled: bool
    ) -> None:
        """One generation's accounting (``decode_s``: from its first token to its last)."""
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.cached_tokens += cached
            self.cancelled += cancelled
            if completion > 1 and decode_s > 0:
                self.per_token.observe(decode_s / (completion - 1))
            self.duration.observe(total_s)

    def render(self) -> str:
        with self._lock:
            lines = [f"# HELP {PREFIX}_requests_total HTTP requests by endpoint and status code."]
            lines.append(f"# TYPE {PREFIX}_requests_total counter")
            for (endpoint, status), count in sorted(self.requests.items()):
                lines.append(f'{PREFIX}_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
            for name, value, help_text in (
                ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished generations."),
                ("completion_tokens_total", self.completion_tokens, "Generated tokens."),
                ("cached_prompt_tokens_total", self.cached_tokens, "Prompt tokens served from the KV cache."),
                ("cancelled_total", self.cancelled, "Generations cancelled (the client went away)."),
            ):
                lines += [f"# HELP {PREFIX}_{name} {help_text}", f"# TYPE {PREFIX}_{name} counter"]
                lines.append(f"{PREFIX}_{name} {value}")
            for name, value, help_text in (
                ("queue_depth", self.queue_depth, "Requests waiting for the worker."),
                ("running_requests", self.running, "Requests generating now."),
            ):
                lines += [f"# HELP {PREFIX}_{name} {help_text}", f"# TYPE {PREFIX}_{name} gauge"]
                lines.append(f"{PREFIX}_{name} {value}")
            for histogram in (self.ttft, self.per_token, self.duration):
                lines += histogram.lines()
        return "\n".join(lines) + "\n"
