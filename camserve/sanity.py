"""The parameter-randomisation sanity check's result, as the calibration file stores it and
the server reports it (docs/score.md#sanity-check).

``camserve calibrate`` runs the check (``camserve.tools.sanity``) and writes the result into
the calibration file as plain types (it is loaded with ``weights_only=True``). At load the
server logs it, exports it as gauges, shows it in the model's description, and, when the
maps do not depend on the model, marks every answer ``"sanity": "failed"``.
"""

from __future__ import annotations

from dataclasses import dataclass

PASSED = "passed"
FAILED = "failed"
CALIBRATION_KEY = "sanity"
# The statistic the verdict reads, and the one the gauge exports per step.
VERDICT_STATISTIC = "rank_correlation"


@dataclass(frozen=True)
class Spread:
    """A similarity over the check's images: its median and 90th percentile."""

    median: float
    p90: float

    def to_dict(self) -> dict:
        return {"median": self.median, "p90": self.p90}

    @classmethod
    def from_dict(cls, data: dict) -> Spread:
        return cls(float(data["median"]), float(data["p90"]))


@dataclass(frozen=True)
class SanityStep:
    """The maps after randomising every stage up to and including ``stage`` (cumulative),
    compared with the trained model's maps of the same images and classes."""

    stage: str  # the module randomised at this step (a name of the served model)
    rank_correlation: Spread  # Spearman of the Grad-CAM maps ReLU(M)
    rank_correlation_signed: Spread  # Spearman of M ("without absolute values")
    rank_correlation_abs: Spread  # Spearman of |M| ("with absolute values")
    ssim: Spread  # SSIM of the peak-normalised maps at the input size
    peak_kept: float  # share of images whose map peak stays in the same cell

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "rank_correlation": self.rank_correlation.to_dict(),
            "rank_correlation_signed": self.rank_correlation_signed.to_dict(),
            "rank_correlation_abs": self.rank_correlation_abs.to_dict(),
            "ssim": self.ssim.to_dict(),
            "peak_kept": self.peak_kept,
        }

    @classmethod
    def from_dict(cls, data: dict) -> SanityStep:
        return cls(
            stage=str(data["stage"]),
            rank_correlation=Spread.from_dict(data["rank_correlation"]),
            rank_correlation_signed=Spread.from_dict(data["rank_correlation_signed"]),
            rank_correlation_abs=Spread.from_dict(data["rank_correlation_abs"]),
            ssim=Spread.from_dict(data["ssim"]),
            peak_kept=float(data["peak_kept"]),
        )


@dataclass(frozen=True)
class SanityResult:
    """The cascade's curve, one step per stage from the head down, and its verdict."""

    verdict: str  # PASSED or FAILED
    threshold: float  # at the verdict step
    head_threshold: float  # at step 1, the head alone
    verdict_step: int  # the step the verdict reads: the head and the last stage (1-based)
    seed: int
    images: int
    steps: tuple[SanityStep, ...]

    @property
    def failed(self) -> bool:
        return self.verdict == FAILED

    def to_calibration(self) -> dict:
        """What it adds to the calibration file (plain types: ``weights_only`` loads)."""
        return {CALIBRATION_KEY: self.to_dict()}

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "threshold": self.threshold,
            "head_threshold": self.head_threshold,
            "verdict_statistic": VERDICT_STATISTIC,
            "verdict_step": self.verdict_step,
            "seed": self.seed,
            "images": self.images,
            "steps": [step.to_dict() for step in self.steps],
        }

    @classmethod
    def from_calibration(cls, data: dict) -> SanityResult | None:
        """From a calibration file's dict; None for a file written before the check existed."""
        entry = data.get(CALIBRATION_KEY)
        if entry is None:
            return None
        if entry["verdict"] not in (PASSED, FAILED):
            raise ValueError(f"unknown sanity verdict {entry['verdict']!r}")
        return cls(
            verdict=entry["verdict"],
            threshold=float(entry["threshold"]),
            head_threshold=float(entry["head_threshold"]),
            verdict_step=int(entry["verdict_step"]),
            seed=int(entry["seed"]),
            images=int(entry["images"]),
            steps=tuple(SanityStep.from_dict(step) for step in entry["steps"]),
        )

    def describe(self) -> dict:
        """The model description's ``sanity`` entry: the verdict and the whole curve."""
        return self.to_dict()

    def log_line(self) -> str:
        curve = ", ".join(f"{step.stage} {step.rank_correlation.median:.2f}" for step in self.steps)
        return (
            f"sanity check {self.verdict}: median rank correlation with the trained model's "
            f"maps after each randomisation step ({self.images} images, seed {self.seed}): "
            f"{curve}; the verdict reads step {self.verdict_step} against {self.threshold} "
            f"and step 1 against {self.head_threshold}"
        )
