"""Inputs watched: training statistics per feature, running statistics, drift diagnostics.

The exporter computes a :class:`FeatureStats` per feature from the training
data (:func:`training_stats` over the training split's model inputs); the
manifest carries them as ``training_stats`` (:mod:`edge.manifest`). The daemon
keeps one :class:`DriftMonitor` per pipeline and device (:mod:`edge.watch`) and
feeds it one reading per feature per sample: a snapshot's vector, or for a
window each new row of the window (per channel).

Three diagnostics, each raised once when its condition starts and cleared when
it ends (:class:`Diagnostic` with ``raised`` True/False):

* ``drift`` - the Population Stability Index over the last ``window`` samples,
  binned on the training deciles: ``PSI = sum((a - e) * ln(a / e))`` with ``e``
  the training fraction and ``a`` the recent fraction of each bin (floored at
  1e-4). The usual reading (Siddiqi, *Credit Risk Scorecards*, 2006; Yurdakul,
  "Statistical properties of the population stability index", 2018): below
  0.1 no significant shift, 0.1-0.25 moderate, above 0.25 significant. Raised
  above ``psi_alarm`` (0.25), cleared below ``psi_clear`` (0.1); judged only on
  a full window. With ``k`` bins and ``n`` samples an unchanged distribution
  gives PSI of about ``(k - 1) / n`` (0.04 for 10 bins and 240 samples).
* ``out_of_range`` - ``range_after`` consecutive readings outside the training
  range widened by ``range_margin`` of its width on each side (a broken plug,
  a unit change towards larger numbers).
* ``stuck`` - the same value ``stuck_after`` times in a row, where training's
  longest run of one repeated value was shorter (a plug that reads 0 W for
  hours while off had long runs in training, so it is not flagged).

A unit change (W to kW, °C to °F) shows as ``drift`` and usually as
``out_of_range``. Cost per sample and feature: one ``bisect`` over at most 9
edges, a ring-buffer update and the PSI terms of the (at most two) bins whose
count changed, re-summed in full once a window; no allocation.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

Kind = Literal["drift", "out_of_range", "stuck"]
PSI_FLOOR = 1e-4
DECILES = tuple(i / 10 for i in range(1, 10))


class FeatureStats(BaseModel):
    """What one input feature looked like in training (manifest ``training_stats``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Feature (snapshot) or channel (window) name.")
    count: int = Field(ge=1, description="Training readings these figures come from.")
    mean: float
    std: float = Field(ge=0)
    min: float
    max: float
    quantiles: list[float] = Field(description="Training deciles (0.1 ... 0.9), ascending.")
    bin_fractions: list[float] = Field(
        description="Training fraction in each bin cut at the distinct quantiles (one more than edges)."
    )
    longest_run: int = Field(
        ge=1,
        description="Longest run of one repeated value in training order; with windows, the count "
        "when some window is one value throughout (the run may have been longer: stuck is not judged).",
    )
    judge_drift: bool = Field(
        True,
        description="False when training pools many devices (one device's own spread is narrower, "
        "so its PSI against the pool is high while nothing is wrong): drift is not judged.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> FeatureStats:
        figures = [self.mean, self.std, self.min, self.max, *self.quantiles, *self.bin_fractions]
        if not all(math.isfinite(v) for v in figures):
            raise ValueError(f"{self.name}: every figure must be a finite number")
        if self.min > self.max:
            raise ValueError(f"{self.name}: min {self.min} is above max {self.max}")
        if len(self.quantiles) != len(DECILES) or any(
            b < a for a, b in zip(self.quantiles, self.quantiles[1:], strict=False)
        ):
            raise ValueError(f"{self.name}: quantiles must be the {len(DECILES)} deciles, ascending")
        if len(self.bin_fractions) != len(self.edges) + 1:
            raise ValueError(
                f"{self.name}: {len(self.bin_fractions)} bin_fractions for {len(self.edges)} distinct "
                f"quantiles (want {len(self.edges) + 1})"
            )
        if any(f < 0 for f in self.bin_fractions) or abs(sum(self.bin_fractions) - 1.0) > 1e-3:
            raise ValueError(f"{self.name}: bin_fractions must be non-negative and sum to 1")
        return self

    @property
    def edges(self) -> list[float]:
        return sorted(set(self.quantiles))

    @classmethod
    def from_samples(cls, name: str, values: npt.ArrayLike) -> FeatureStats:
        """Statistics of one feature's training readings, in their time order. A 2-D array is
        one series per row (windows): runs are counted within a row, never across two."""
        raw = np.asarray(values, dtype=np.float64)
        series = raw.reshape(1, -1) if raw.ndim <= 1 else raw.reshape(raw.shape[0], -1)
        x = raw.reshape(-1)
        x = x[np.isfinite(x)]
        if x.size == 0:
            raise ValueError(f"{name}: no finite training values")
        runs = [_longest_run(row[np.isfinite(row)]) for row in series]
        longest = max(runs, default=1)
        if raw.ndim >= 2 and any(r == row.size and r > 0 for r, row in zip(runs, series, strict=True)):
            longest = int(x.size)  # a window of one value: how long the run really was is unknown
        quantiles = [float(q) for q in np.quantile(x, DECILES)]
        edges = sorted(set(quantiles))
        bins = np.searchsorted(np.asarray(edges), x, side="right")
        fractions = np.bincount(bins, minlength=len(edges) + 1) / x.size
        return cls(
            name=name,
            count=int(x.size),
            mean=float(x.mean()),
            std=float(x.std()),
            min=float(x.min()),
            max=float(x.max()),
            quantiles=quantiles,
            bin_fractions=[float(f) for f in fractions],
            longest_run=max(longest, 1),
        )


def _longest_run(x: npt.NDArray[np.float64]) -> int:
    if x.size == 0:
        return 0
    change = np.flatnonzero(np.diff(x) != 0)
    bounds = np.concatenate(([-1], change, [x.size - 1]))
    return int(np.diff(bounds).max())


def training_stats(features: Sequence[str], x: npt.ArrayLike, *, pooled: bool = False) -> list[FeatureStats]:
    """Per-feature statistics of a training split's model inputs: ``[N, F]`` snapshots (rows in
    time order) or ``[N, L, C]`` windows (each window a series; channel ``c`` is feature ``c``)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim not in (2, 3) or arr.shape[-1] != len(features):
        raise ValueError(f"training inputs of shape {arr.shape} do not match features {list(features)}")
    stats = [FeatureStats.from_samples(f, arr[..., i]) for i, f in enumerate(features)]
    return [s.model_copy(update={"judge_drift": False}) for s in stats] if pooled else stats


@dataclass(frozen=True)
class Diagnostic:
    feature: str
    kind: Kind
    raised: bool  # True when the condition starts, False when it ends
    detail: str


class FeatureMonitor:
    """Running statistics of one feature for one device; O(1) per reading."""

    def __init__(
        self,
        stats: FeatureStats,
        *,
        window: int = 240,
        psi_alarm: float = 0.25,
        psi_clear: float = 0.1,
        range_margin: float = 0.1,
        range_after: int = 3,
        stuck_after: int = 30,
    ) -> None:
        self.stats = stats
        self.edges = stats.edges
        self.expected = [max(f, PSI_FLOOR) for f in stats.bin_fractions]
        self.window = window
        self.psi_alarm = psi_alarm
        self.psi_clear = psi_clear
        width = stats.max - stats.min
        margin = range_margin * width if width > 0 else max(abs(stats.max) * range_margin, 1e-9)
        self.low = stats.min - margin
        self.high = stats.max + margin
        self.range_after = range_after
        self.stuck_after = max(stuck_after, stats.longest_run + 1)
        self.ring = [0] * window
        self.counts = [0] * len(self.expected)
        self.seen = 0
        self.outside = 0
        self.last: float | None = None
        self.run = 0
        self.active: set[Kind] = set()
        self.psi = 0.0
        self.terms = [0.0] * len(self.expected)

    def term(self, b: int) -> float:
        a = max(self.counts[b] / self.window, PSI_FLOOR)
        e = self.expected[b]
        return (a - e) * math.log(a / e)

    def _update_psi(self, changed: tuple[int, ...]) -> None:
        """Re-sum only the bins whose count changed; a full re-sum once a window against rounding."""
        if self.seen % self.window == 0:
            self.terms = [self.term(b) for b in range(len(self.counts))]
            self.psi = sum(self.terms)
            return
        for b in changed:
            new = self.term(b)
            self.psi += new - self.terms[b]
            self.terms[b] = new

    def _flip(self, kind: Kind, on: bool, detail: str, out: list[Diagnostic]) -> None:
        if on and kind not in self.active:
            self.active.add(kind)
            out.append(Diagnostic(self.stats.name, kind, True, detail))
        elif not on and kind in self.active:
            self.active.discard(kind)
            out.append(Diagnostic(self.stats.name, kind, False, detail))

    def observe(self, value: float, out: list[Diagnostic]) -> None:
        """Take one reading; appends to ``out`` any diagnostic raised or cleared."""
        if not math.isfinite(value):
            return
        b = bisect.bisect_right(self.edges, value)
        slot = self.seen % self.window
        old = self.ring[slot]
        if self.seen >= self.window:
            self.counts[old] -= 1
        self.ring[slot] = b
        self.counts[b] += 1
        self.seen += 1
        # A diagnostic's text is built only when its state flips: formatting it for every reading
        # was most of this method's cost (it runs per device and feature on every input).
        active = self.active
        if self.seen >= self.window and self.stats.judge_drift:
            self._update_psi((b,) if b == old else (b, old))
            if self.psi > self.psi_alarm:
                if "drift" not in active:
                    self._flip("drift", True, f"PSI {self.psi:.2f} over the last {self.window} samples", out)
            elif self.psi < self.psi_clear and "drift" in active:
                self._flip("drift", False, f"PSI {self.psi:.2f}", out)
        if value < self.low or value > self.high:
            self.outside += 1
        else:
            self.outside = 0
        outside = self.outside >= self.range_after
        if outside != ("out_of_range" in active):
            detail = f"{value:g} outside training range [{self.stats.min:g}, {self.stats.max:g}]"
            self._flip("out_of_range", outside, detail, out)
        self.run = self.run + 1 if value == self.last else 1
        self.last = value
        stuck = self.run >= self.stuck_after
        if stuck != ("stuck" in active):
            detail = f"{value:g} for {self.run} samples (training's longest run {self.stats.longest_run})"
            self._flip("stuck", stuck, detail, out)


class DriftMonitor:
    """One pipeline and device: a :class:`FeatureMonitor` per feature, in the model's feature order."""

    def __init__(self, stats: Sequence[FeatureStats], **options: Any) -> None:
        self.features = [FeatureMonitor(s, **options) for s in stats]

    def observe(self, values: Sequence[float]) -> list[Diagnostic]:
        """One reading per feature (for a window, the newest row). Returns changes, usually []."""
        if len(values) != len(self.features):
            raise ValueError(f"expected {len(self.features)} feature values, got {len(values)}")
        out: list[Diagnostic] = []
        for monitor, value in zip(self.features, values, strict=True):
            monitor.observe(float(value), out)
        return out

    @property
    def active(self) -> dict[str, set[Kind]]:
        return {m.stats.name: set(m.active) for m in self.features if m.active}
