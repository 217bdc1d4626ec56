"""Explanation health as TorchServe metrics (declared in ``config/metrics.yaml``).

This module does not import TorchServe: the handler passes in TorchServe's metrics cache
(``context.metrics``) and its ``MetricTypes`` enum, and everything else is plain Python,
so the recording logic can be unit-tested with a fake cache.

Every name and label here must match ``config/metrics.yaml``: TorchServe's frontend only
exports metrics declared there, and a metric emitted with a different number of label values
than declared is dropped (with a log line, not an error).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from camserve.errors import ERROR_CODES
from camserve.sanity import SanityResult
from camserve.zero_reference import ZeroReference

log = logging.getLogger(__name__)

EXPLANATIONS = "camserve_explanations_total"
UNSTABLE = "camserve_unstable_explanations_total"
EMPTY_MAPS = "camserve_empty_maps_total"
SCORE_BANDS_METRIC = "camserve_zero_reference_score_band_total"
ERRORS = "camserve_errors_total"
COMPENSABLE = "camserve_compensable"
CLASS_EXPLANATIONS = "camserve_class_explanations_total"
CLASS_UNSTABLE = "camserve_class_unstable_explanations_total"
# The sum of the explanations' scores: with EXPLANATIONS, the mean score. One line per batch
# (a histogram needs one line per explanation; its buckets were no use on [0, 1], see
# docs/monitoring.md, and the bands give the distribution).
SCORE_SUM = "camserve_zero_reference_score_sum_total"
STAGE_SECONDS = "camserve_stage_duration_seconds"
BASELINE_SHARE = "camserve_zero_reference_score_baseline_share"
BASELINE_IMAGES = "camserve_zero_reference_score_baseline_images"
SANITY_RANK_CORRELATION = "camserve_sanity_rank_correlation"
SANITY_PASSED = "camserve_sanity_passed"
# TorchServe's own name (BaseHandler.handle records it; camserve's handler overrides handle).
HANDLER_TIME = "HandlerTime"

METRICS = {
    EXPLANATIONS: "counter",
    UNSTABLE: "counter",
    EMPTY_MAPS: "counter",
    SCORE_BANDS_METRIC: "counter",
    ERRORS: "counter",
    CLASS_EXPLANATIONS: "counter",
    CLASS_UNSTABLE: "counter",
    SCORE_SUM: "counter",
    COMPENSABLE: "gauge",
    BASELINE_SHARE: "gauge",
    BASELINE_IMAGES: "gauge",
    SANITY_RANK_CORRELATION: "gauge",
    SANITY_PASSED: "gauge",
    STAGE_SECONDS: "histogram",
}
"""Every camserve metric and its type; a test checks this against config/metrics.yaml."""
RECORDED = {**METRICS, HANDLER_TIME: "gauge"}
"""Every metric the handler records: camserve's and TorchServe's HandlerTime."""
# Explanation metrics carry requested="true|false". "false" is the model's own prediction: the
# top-1 class, or on a multi-label model each present label; "true" is a class the client chose
# (``target``) or, multi-label, the most probable label explained although none is present.
# Alerts and the drift baseline look at "false" only (docs/monitoring.md).
REQUESTED_VALUES = ("false", "true")

STAGES = ("decode", "forward_gradcam", "score", "encode")
INTERNAL_ERROR = "internal_error"
ERROR_REASONS = (*ERROR_CODES, INTERNAL_ERROR)
BAND_COUNT = 10
SCORE_BANDS = tuple(f"{i / BAND_COUNT:.1f}-{(i + 1) / BAND_COUNT:.1f}" for i in range(BAND_COUNT))
# The Level TorchServe gives metrics recorded from a handler (add_metric does the same).
LEVEL = "Model"
# Per-class series multiply the model's series count; above this many classes they are off.
MAX_CLASS_LABELS = 20


def score_band(score: float) -> str:
    """The 0.1-wide band holding ``score``: [0, 0.1) -> "0.0-0.1", ..., [0.9, 1] -> "0.9-1.0"."""
    index = int(min(max(score, 0.0), 1.0) * BAND_COUNT)
    return SCORE_BANDS[min(index, BAND_COUNT - 1)]


@dataclass(frozen=True)
class ScoreBaseline:
    """The score distribution of a model's calibration images, in ``SCORE_BANDS``.

    ``camserve calibrate`` computes it from the calibration images' explanations of the model's
    own predictions (the top-1 class; multi-label: every present label) and stores it in the
    calibration file; exported at load, it is what the live band shares of unrequested
    explanations are compared with (the drift rule in config/prometheus).
    """

    shares: dict[str, float]  # band -> share of the images, summing to 1
    images: int

    @classmethod
    def from_scores(cls, scores: Iterable[float]) -> ScoreBaseline:
        counts = dict.fromkeys(SCORE_BANDS, 0)
        for score in scores:
            counts[score_band(score)] += 1
        total = sum(counts.values())
        if total == 0:
            raise ValueError("no scores for a baseline")
        return cls({band: count / total for band, count in counts.items()}, total)

    def to_dict(self) -> dict:
        """The entries it adds to the calibration file (plain types: ``weights_only`` loads)."""
        return {"score_baseline": dict(self.shares), "score_baseline_images": self.images}

    @classmethod
    def from_dict(cls, data: dict) -> ScoreBaseline | None:
        """From a calibration file's dict; None for a file written before baselines existed."""
        if "score_baseline" not in data:
            return None
        shares = {str(band): float(share) for band, share in data["score_baseline"].items()}
        if set(shares) != set(SCORE_BANDS) or abs(sum(shares.values()) - 1) > 1e-6:
            raise ValueError(f"a score baseline needs shares of the bands {SCORE_BANDS}")
        return cls(shares, int(data["score_baseline_images"]))


def sanity_step_label(number: int, stage: str) -> str:
    """The ``step`` label of a sanity step: its number, zero-padded so that steps sort in
    order, and the stage it randomised (``02-layer4.2``)."""
    return class_label_value(f"{number:02d}-{stage}")


def class_label_value(label: str) -> str:
    """A class label safe inside TorchServe's metric line (``|#name:value,name:value|``)."""
    return re.sub(r"[,:|#\s]", "_", label) or "_"


def error_reason(code: str) -> str:
    """Clamp an error code to the declared set, so a new code cannot add label values."""
    return code if code in ERROR_REASONS else INTERNAL_ERROR


class Telemetry:
    """Records camserve's metrics for one model into a TorchServe metrics cache.

    ``cache`` needs ``get_metric(name, metric_type)`` returning an object with
    ``add_or_update(value, dimension_values)``; ``metric_types`` maps "counter", "gauge",
    "histogram" to what ``get_metric`` expects (TorchServe's ``MetricTypes`` enum does).
    Label values are passed in full (extra labels, then ModelName, Level) because
    ``add_metric`` drops ModelName when a call carries no request id (at load time).
    """

    def __init__(
        self,
        cache: Any,
        metric_types: Callable[[str], Any],
        model_name: str,
        class_labels: list[str] | None = None,
    ) -> None:
        """``class_labels``: record per-class counters (the ``class_metrics`` setting)."""
        self.cache = cache
        self.metric_types = metric_types
        self.model_name = model_name
        self._failed: set[str] = set()
        self._stage_totals: dict[str, float] | None = None  # inside handling(): stage -> s
        self.class_labels = None
        if class_labels is not None and len(class_labels) > MAX_CLASS_LABELS:
            log.warning(
                "class_metrics is on but %s has %d classes (more than %d): no per-class series",
                model_name,
                len(class_labels),
                MAX_CLASS_LABELS,
            )
        elif class_labels is not None:
            self.class_labels = [class_label_value(label) for label in class_labels]

    def _record(self, name: str, value: float, *labels: str) -> None:
        try:
            metric = self.cache.get_metric(name, self.metric_types(RECORDED[name]))
            metric.add_or_update(value, [*labels, self.model_name, LEVEL])
        except Exception as err:  # noqa: BLE001 - a metrics problem must never fail a prediction
            # Typically a server started without camserve's metrics.yaml: say so once per
            # metric instead of once per request.
            if name not in self._failed:
                self._failed.add(name)
                log.warning(
                    "could not record metric %s (%s); is metrics_config set to camserve's "
                    "config/metrics.yaml?",
                    name,
                    err,
                )

    def loaded(
        self,
        compensable: bool,
        baseline: ScoreBaseline | None = None,
        sanity: SanityResult | None = None,
    ) -> None:
        """At model load: set the gauges and create every counter series at 0.

        Without the zeros a series would appear at its first increment, and Prometheus's
        ``rate``/``increase`` cannot see the step from "absent" to 1. Without a ``baseline``
        (an uncalibrated archive) the baseline-images gauge is 0 and no share series exists,
        so the drift rule has nothing to compare with and stays silent. Without a ``sanity``
        result no sanity series exists, and the sanity alert stays silent.
        """
        self._record(COMPENSABLE, 1.0 if compensable else 0.0)
        self._record(BASELINE_IMAGES, float(baseline.images) if baseline else 0.0)
        for band, share in (baseline.shares if baseline else {}).items():
            self._record(BASELINE_SHARE, share, band)
        if sanity is not None:
            self._record(SANITY_PASSED, 0.0 if sanity.failed else 1.0)
            for number, step in enumerate(sanity.steps, 1):
                label = sanity_step_label(number, step.stage)
                self._record(SANITY_RANK_CORRELATION, step.rank_correlation.median, label)
        for requested in REQUESTED_VALUES:
            for name in (EXPLANATIONS, UNSTABLE, EMPTY_MAPS, SCORE_SUM):
                self._record(name, 0, requested)
            for band in SCORE_BANDS:
                self._record(SCORE_BANDS_METRIC, 0, band, requested)
        for reason in ERROR_REASONS:
            self._record(ERRORS, 0, reason)
        for label in self.class_labels or []:
            self._record(CLASS_EXPLANATIONS, 0, label)
            self._record(CLASS_UNSTABLE, 0, label)

    def explained_batch(self, shown: Iterable[tuple[ZeroReference, int | None, bool]]) -> None:
        """A batch's explanations that were returned to clients, as (score block, class index,
        requested) each (``Explanation.monitored()``: one per answer, or on a multi-label
        model one per explained label). A counter is incremented once per label set by the
        batch's count (the score sum by the batch's sum of scores): every metric is a log line
        that the worker writes and the frontend parses, so a batch of 8 top-1 explanations
        emits about 4 lines here, not 40."""
        counts: Counter[tuple[str, ...]] = Counter()
        for result, target, requested in shown:
            flag = REQUESTED_VALUES[requested]
            counts[EXPLANATIONS, flag] += 1
            counts[SCORE_SUM, flag] += result.score
            counts[SCORE_BANDS_METRIC, score_band(result.score), flag] += 1
            if not result.stable:
                counts[UNSTABLE, flag] += 1
            if result.map_empty:
                counts[EMPTY_MAPS, flag] += 1
            if self.class_labels is not None and target is not None:
                counts[CLASS_EXPLANATIONS, self.class_labels[target]] += 1
                if not result.stable:
                    counts[CLASS_UNSTABLE, self.class_labels[target]] += 1
        for (name, *labels), count in counts.items():
            self._record(name, count, *labels)

    def error(self, code: str) -> None:
        self.errors([code])

    def errors(self, codes: Iterable[str]) -> None:
        """A batch's errors, one line per reason with the batch's count."""
        for reason, count in Counter(error_reason(code) for code in codes).items():
            self._record(ERRORS, count, reason)

    def stage(self, stage: str, seconds: float) -> None:
        """``seconds`` spent in ``stage``: inside ``handling()`` added to the batch's total
        for the stage, observed when the batch ends; outside it, observed at once."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        if self._stage_totals is None:
            self._record(STAGE_SECONDS, seconds, stage)
        else:
            self._stage_totals[stage] = self._stage_totals.get(stage, 0.0) + seconds

    @contextmanager
    def handling(self) -> Iterator[None]:
        """One batch through the handler, also when the block raises: TorchServe's
        ``HandlerTime`` gauge in ms (as ``BaseHandler.handle`` records it), and one observation
        per stage, the batch's total (one log line per stage, not per item).
        """
        start = time.perf_counter()
        self._stage_totals = {}
        try:
            yield
        finally:
            totals, self._stage_totals = self._stage_totals, None
            for stage, seconds in totals.items():
                self._record(STAGE_SECONDS, seconds, stage)
            self._record(HANDLER_TIME, round((time.perf_counter() - start) * 1000, 2))

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Count how long the block took (also when it raises) as time in ``stage``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage(stage, time.perf_counter() - start)
