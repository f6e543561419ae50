"""A small Prometheus registry: labelled counters, a latency histogram and a gauge, text 0.0.4.

Hand-rolled so the service needs no metrics dependency; every label value comes from a
bounded set (route templates, status codes, error codes, chains, custody types, method names
signd knows), never from raw request data.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import accumulate
from typing import Final

LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


class Counter:
    def __init__(self, name: str, help_text: str, label_names: Sequence[str]) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(label_names)
        self._values: dict[Labels, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] += amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def expose(self) -> list[str]:
        with self._lock:
            items = list(self._values.items())
        return _counter_lines(self.name, self.help_text, self.label_names, items)


class CounterReading:
    """A counter whose totals something else keeps (by label values), read when exposed:
    it counts what happened whichever way it was set off."""

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str],
        read: Callable[[], Mapping[Labels, float]],
    ) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(label_names)
        self._read = read

    def value(self, *labels: str) -> float:
        return self._read().get(labels, 0.0)

    def expose(self) -> list[str]:
        items = self._read().items()
        return _counter_lines(self.name, self.help_text, self.label_names, items)


def _counter_lines(
    name: str, help_text: str, label_names: Sequence[str], items: Iterable[tuple[Labels, float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
    for labels, value in sorted(items):
        lines.append(f"{name}{_format_labels(label_names, labels)} {_number(value)}")
    return lines


class Histogram:
    """Observations counted per bucket; each is counted once, in the first bucket whose bound
    it does not exceed (or above them all), and made cumulative when exposed."""

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str],
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(label_names)
        self.buckets = tuple(buckets)
        self._counts: dict[Labels, list[int]] = {}
        """labels -> observations per bucket, the last above every bound (not cumulative)"""
        self._sums: dict[Labels, float] = defaultdict(float)
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        bucket = bisect_left(self.buckets, value)
        with self._lock:
            counts = self._counts.get(labels)
            if counts is None:
                counts = self._counts[labels] = [0] * (len(self.buckets) + 1)
            counts[bucket] += 1
            self._sums[labels] += value

    def count(self, *labels: str) -> int:
        with self._lock:
            counts = self._counts.get(labels)
            return sum(counts) if counts else 0

    def expose(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = sorted((labels, list(counts)) for labels, counts in self._counts.items())
            sums = dict(self._sums)
        for labels, counts in items:
            names, bounds = self.label_names, [*map(_number, self.buckets), "+Inf"]
            cumulative = list(accumulate(counts))
            for bound, count in zip(bounds, cumulative, strict=True):
                label_text = _format_labels(names, labels, f'le="{bound}"')
                lines.append(f"{self.name}_bucket{label_text} {count}")
            label_text = _format_labels(names, labels)
            lines.append(f"{self.name}_sum{label_text} {_number(sums[labels])}")
            lines.append(f"{self.name}_count{label_text} {cumulative[-1]}")
        return lines


class Gauge:
    """One value without labels that goes up and down; no sample until it is first set."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help_text = help_text
        self._value: float | None = None
        self._lock = threading.Lock()

    def set(self, value: float) -> None:
        with self._lock:
            self._value = value

    def value(self) -> float | None:
        with self._lock:
            return self._value

    def expose(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} gauge"]
        value = self.value()
        if value is not None:
            lines.append(f"{self.name} {_number(value)}")
        return lines


class ApiMetrics:
    """The service's metrics; one instance per app. ``reload_counts`` gives the gate's
    reloads of its clients and policy files so far, by outcome (none without a gate)."""

    def __init__(self, reload_counts: Callable[[], Mapping[str, int]] = dict) -> None:
        self.requests = Counter(
            "signd_http_requests_total",
            "HTTP requests by route template, method and status.",
            ("route", "method", "status"),
        )
        self.latency = Histogram(
            "signd_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ("route",),
        )
        self.signatures = Counter(
            "signd_signatures_total",
            "Signatures made, by chain, custody type and kind of request.",
            ("chain", "custody", "kind"),
        )
        self.errors = Counter(
            "signd_errors_total", "Errors answered, by signd error code.", ("code",)
        )
        self.rpc_calls = Counter(
            "signd_jsonrpc_calls_total",
            "JSON-RPC calls by method (methods signd does not serve count as 'other').",
            ("method", "outcome"),
        )
        self.mqtt_duplicates = Counter(
            "signd_mqtt_duplicates_total",
            "MQTT requests answered with an earlier copy's remembered answer, not performed again.",
            (),
        )
        self.mqtt_connected = Gauge(
            "signd_mqtt_connected",
            "1 while the MQTT adapter is connected and subscribed to the request topic, else 0.",
        )
        self.config_reloads = CounterReading(
            "signd_config_reloads_total",
            "Reloads of the clients and policy files (SIGHUP) by outcome: reloaded (both put"
            " in force) or refused (neither: the files in force stay).",
            ("outcome",),
            lambda: {(outcome,): count for outcome, count in reload_counts().items()},
        )

    def expose(self) -> str:
        families = (
            self.requests,
            self.latency,
            self.signatures,
            self.errors,
            self.rpc_calls,
            self.mqtt_duplicates,
            self.mqtt_connected,
            self.config_reloads,
        )
        return "\n".join(line for family in families for line in family.expose()) + "\n"
