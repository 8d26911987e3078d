"""Prometheus counters and histograms for the event loop's hot paths, updated without locks.

prometheus_client guards every ``inc`` and ``observe`` with a lock, because any thread may
update a series. The request path updates several series per request, always from the one
event-loop thread, so the lock buys nothing there and costs a few microseconds per request.
A :class:`LoopFamily` keeps plain numbers instead, written only by the loop and read, by the
scrape thread, through :class:`LoopCollector` (registered in the injected registry like any
other collector). Reads are consistent where Prometheus needs them to be: a histogram's
``+Inf`` bucket and ``_count`` are computed from the same copy of the bucket counts.

Use these only for series that one thread updates; anything else keeps prometheus_client's
own types.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Literal

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry


class LoopCounter:
    """A monotonically increasing count."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0; not checked, this is the hot path)."""
        self.value += amount


class LoopHistogram:
    """Observations counted into fixed buckets (upper bounds inclusive, as Prometheus has it)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation of ``value`` (in the family's unit)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class LoopFamily:
    """One metric name: its children by label values, created on first use."""

    def __init__(self, kind: Literal["counter", "histogram"], name: str, documentation: str,
                 labelnames: Sequence[str], buckets: Sequence[float] = ()) -> None:
        if kind == "histogram" and not buckets:
            raise ValueError(f"histogram {name} needs buckets")
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(sorted(buckets))
        self._children: dict[tuple[str, ...], LoopCounter | LoopHistogram] = {}

    def counter(self, *values: str) -> LoopCounter:
        """The counter child of these label values (a counter family only)."""
        child = self._child(values)
        assert isinstance(child, LoopCounter)
        return child

    def histogram(self, *values: str) -> LoopHistogram:
        """The histogram child of these label values (a histogram family only)."""
        child = self._child(values)
        assert isinstance(child, LoopHistogram)
        return child

    def children(self) -> list[tuple[tuple[str, ...], LoopCounter | LoopHistogram]]:
        """A copy of (label values, child) pairs (safe from the scrape thread)."""
        return list(self._children.items())

    def _child(self, values: tuple[str, ...]) -> LoopCounter | LoopHistogram:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = (
                LoopCounter() if self.kind == "counter" else LoopHistogram(self.buckets))
        return child

    def collect(self) -> Metric:
        """The family as prometheus_client exposes it (called by the scrape thread)."""
        children = list(self._children.items())  # one atomic copy: the loop may add more
        if self.kind == "counter":
            counters = CounterMetricFamily(self.name, self.documentation,
                                           labels=self.labelnames)
            for values, child in children:
                assert isinstance(child, LoopCounter)
                counters.add_metric(values, child.value)
            return counters
        histograms = HistogramMetricFamily(self.name, self.documentation,
                                           labels=self.labelnames)
        for values, child in children:
            assert isinstance(child, LoopHistogram)
            counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for bound, count in zip((*child.bounds, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((_format_bound(bound), float(cumulative)))
            histograms.add_metric(values, buckets, total)
        return histograms


class LoopCollector(Collector):
    """Exposes a set of :class:`LoopFamily` through a registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._families: list[LoopFamily] = []
        registry.register(self)

    def family(self, kind: Literal["counter", "histogram"], name: str, documentation: str,
               labelnames: Sequence[str], buckets: Sequence[float] = ()) -> LoopFamily:
        """Create and expose a new family (before the server starts serving)."""
        family = LoopFamily(kind, name, documentation, labelnames, buckets)
        self._families.append(family)
        return family

    def collect(self) -> Iterator[Metric]:
        for family in list(self._families):
            yield family.collect()


def _format_bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
