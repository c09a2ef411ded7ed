"""Checks of a window of captures against the baseline, each answering OK, VIOLATION or SKIPPED with its numbers.

A drift check fires only when three things hold: the window has enough records, the shift is unlikely to be
sampling noise at this window's and the baseline's sizes (a p-value below ALPHA), and the shift is large
enough to matter (an effect size above a floor, so that a busy hour does not flag a negligible shift).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from monitoring.captures import CHANNELS, Captures

# ------------------------------------------------------------------------------------------- thresholds
# The defaults baseline.py writes into constraints.json's monitoring_config; the report reads them from there.
DEFAULT_THRESHOLDS = {
    # Below this many records a window is too small for any test: its drift checks say SKIPPED.
    "min_window_records": 30,
    # Significance of every drift test. About ten tests run per window, so an in-distribution window raises
    # a false alarm about once in a hundred windows; at 0.01 it would be one in ten.
    "alpha": 0.001,
    # Class mix (chi-square test of the window's predicted classes against the baseline's): the total
    # variation distance must also exceed this, i.e. at least 15% of answers moved to another class.
    "class_mix_min_tvd": 0.15,
    # Top probability (two-sample KS test against the validation answers): the population stability index
    # over PSI_BINS baseline-quantile bins must also exceed 0.25, the usual "major shift" mark.
    "top_probability_min_psi": 0.25,
    # Low-confidence rate (one-sided two-proportion z-test against the validation rate): it must also be
    # at least this much above the baseline rate, i.e. one more answer in ten refused.
    "low_confidence_margin": 0.10,
    # "Neither" share (one-sided two-proportion z-test of the share of answers whose neither probability,
    # 1 - sum of the class probabilities, exceeds every class probability, against that share on the validation
    # images of the model's classes): it must also be at least this much above the baseline share, i.e. one more
    # answer in ten says "neither bicycle nor motorcycle".
    "neither_margin": 0.10,
    # Per-image channel mean and std, and border-minus-centre luminance (two-sample KS test against the
    # training images): the KS distance must also exceed this; 0.2 is a shift of about half a standard
    # deviation of that statistic. Measured on 100 of the staged bicycle and motorcycle test images against
    # the 900 training images, colour inversion moves border-minus-centre by 0.57 (p about 1e-26) and clean
    # images by 0.10 (p 0.3); in 400 random windows of 30 inverted images every one was flagged.
    "image_min_ks_distance": 0.2,
    # Image size and format: share of a window's images of a size or format never seen in training
    # (Model Monitor's domain_content_threshold); 10% tolerates a few odd clients.
    "domain_content_threshold": 0.10,
    # Records that could not be read: any is a violation, since SageMaker's own records always parse.
    "max_parse_failures": 0,
}
NEITHER_ROUNDING = 1e-6  # a float32 softmax sums to 1 within about 1e-7: a classic answer's neither is 0
PSI_BINS = 5  # few bins: PSI's bias grows with bins/records, and windows hold 50-100 records
PSI_FLOOR = 1e-4  # share given to an empty bin, so that PSI stays finite

# Per-image features of the captured images: name -> (Captures attribute, channel index or None).
BORDER_FEATURE = "image_border_minus_centre"
IMAGE_FEATURES = {
    **{f"image_mean_{channel}": ("channel_means", index) for index, channel in enumerate(CHANNELS)},
    **{f"image_std_{channel}": ("channel_stds", index) for index, channel in enumerate(CHANNELS)},
    BORDER_FEATURE: ("border_minus_centre", None),
}


def default_monitoring_config() -> dict:
    return {"evaluate_constraints": "Enabled", "emit_metrics": "Enabled", "thresholds": dict(DEFAULT_THRESHOLDS)}


@dataclass(frozen=True)
class Result:
    feature_name: str
    constraint_check_type: str
    window: str
    status: str  # OK, VIOLATION or SKIPPED
    description: str

    def as_violation(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "status"}


# ----------------------------------------------------------------------------------------- statistics


def ks_two_sample(first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """Kolmogorov-Smirnov distance of two samples and its asymptotic p-value (Numerical Recipes' ks2)."""
    first, second = np.sort(first), np.sort(second)
    points = np.concatenate([first, second])
    distance = float(
        np.max(
            np.abs(
                np.searchsorted(first, points, side="right") / len(first)
                - np.searchsorted(second, points, side="right") / len(second)
            )
        )
    )
    root = math.sqrt(len(first) * len(second) / (len(first) + len(second)))
    scale = (root + 0.12 + 0.11 / root) * distance
    if scale < 0.2:
        return distance, 1.0
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * scale * scale) for k in range(1, 101))
    return distance, min(1.0, max(0.0, p))


def chi_square_sf(statistic: float, degrees: int) -> float:
    """P(X >= statistic) for a chi-square variable, exact for integer degrees of freedom."""
    half = statistic / 2
    if degrees % 2 == 0:
        return math.exp(-half) * sum(half**i / math.factorial(i) for i in range(degrees // 2))
    return math.erfc(math.sqrt(half)) + math.exp(-half) * sum(
        half ** (i - 0.5) / math.gamma(i + 0.5) for i in range(1, degrees // 2 + 1)
    )


def homogeneity_test(window: np.ndarray, base: np.ndarray) -> float:
    """p-value of the chi-square test that two count vectors come from one distribution."""
    used = (window + base) > 0
    table = np.array([window[used], base[used]], dtype=float)
    if table.shape[1] < 2:
        return 1.0
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    return chi_square_sf(float(((table - expected) ** 2 / expected).sum()), table.shape[1] - 1)


def population_stability_index(window: np.ndarray, base: np.ndarray, bins: int = PSI_BINS) -> float:
    edges = np.unique(np.quantile(base, np.linspace(0, 1, bins + 1)[1:-1]))
    shares = [
        np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1) / len(values)
        for values in (window, base)
    ]
    window_share, base_share = (np.maximum(share, PSI_FLOOR) for share in shares)
    return float(np.sum((window_share - base_share) * np.log(window_share / base_share)))


def one_sided_proportion_test(window_rate: float, window_count: int, base_rate: float, base_count: int) -> float:
    """p-value that the window's rate is no higher than the baseline's (pooled two-proportion z-test)."""
    pooled = (window_rate * window_count + base_rate * base_count) / (window_count + base_count)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / window_count + 1 / base_count))
    if spread == 0:
        return 1.0 if window_rate <= base_rate else 0.0
    return 0.5 * math.erfc((window_rate - base_rate) / spread / math.sqrt(2))


def neither_probability(probabilities: np.ndarray) -> np.ndarray:
    """Per answer (a row of class probabilities), the probability that the photo is neither class: 1 - sum."""
    neither = 1 - probabilities.sum(axis=1)
    return np.where(neither > NEITHER_ROUNDING, neither, 0.0)


def neither_most_likely(probabilities: np.ndarray) -> np.ndarray:
    """Per answer, whether "neither" is more likely than every class."""
    if not probabilities.size:
        return np.zeros(len(probabilities), dtype=bool)
    return neither_probability(probabilities) > probabilities.max(axis=1)


# ------------------------------------------------------------------------------------------- baseline


def feature(statistics: dict, name: str) -> dict:
    return next(entry for entry in statistics["features"] if entry["name"] == name)


def has_feature(statistics: dict, name: str) -> bool:
    return any(entry["name"] == name for entry in statistics["features"])


def sketch_values(statistics: dict, name: str) -> np.ndarray:
    return np.array(feature(statistics, name)["numerical_statistics"]["distribution"]["kll"]["sketch"]["data"][0])


def category_counts(statistics: dict, name: str) -> dict[str, int]:
    buckets = feature(statistics, name)["string_statistics"]["distribution"]["categorical"]["buckets"]
    return {bucket["value"]: bucket["count"] for bucket in buckets}


# ---------------------------------------------------------------------------------------------- checks


class Checker:
    """Runs every check of a window of captures against one baseline."""

    def __init__(self, statistics: dict, constraints: dict):
        self.statistics = statistics
        self.thresholds = {**DEFAULT_THRESHOLDS, **constraints.get("monitoring_config", {}).get("thresholds", {})}
        self.classes = constraints["model"]["classes"]
        self.threshold = constraints["model"]["threshold"]
        self.domains = {
            feature["name"]: feature["string_constraints"]["domains"]
            for feature in constraints["features"]
            if "string_constraints" in feature
        }

    def window(self, captures: Captures, rows: np.ndarray, label: str) -> list[Result]:
        probabilities = captures.probabilities[rows]
        probabilities = probabilities[~np.isnan(probabilities).any(axis=1)] if probabilities.size else probabilities
        with_image = rows[~np.isnan(captures.channel_means[rows, 0])]
        neither = neither_most_likely(probabilities)
        results = [
            self.class_mix(probabilities[~neither], label, int(neither.sum())),
            self.top_probability(probabilities, label),
            self.low_confidence(probabilities, label),
            self.neither(probabilities, label),
        ]
        for name, (attribute, channel) in IMAGE_FEATURES.items():
            column = getattr(captures, attribute)
            values = column[with_image] if channel is None else column[with_image, channel]
            results.append(self.image_statistic(name, values, label))
        for name, column in (("image_size", captures.sizes), ("image_format", captures.formats)):
            results.append(self.domain(name, [column[row] for row in with_image], label))
        return results

    def _too_few(self, name: str, check_type: str, count: int, label: str) -> Result | None:
        needed = self.thresholds["min_window_records"]
        if count < needed:
            return Result(name, check_type, label, "SKIPPED", f"{count} records, fewer than the {needed} a test needs")
        return None

    def class_mix(self, probabilities: np.ndarray, label: str, neither: int = 0) -> Result:
        """The mix of the classes among the answers that name one; `neither` answers were left out."""
        name, check_type = "prediction", "baseline_drift_check"
        if skipped := self._too_few(name, check_type, len(probabilities), label):
            return skipped
        if probabilities.shape[1] != len(self.classes):
            return Result(
                name,
                "data_type_check",
                label,
                "VIOLATION",
                f"answers hold {probabilities.shape[1]} probabilities; the model has "
                f"{len(self.classes)} classes {self.classes}",
            )
        base_counts = category_counts(self.statistics, name)
        base = np.array([base_counts.get(name_, 0) for name_ in self.classes], dtype=float)
        window = np.bincount(probabilities.argmax(axis=1), minlength=len(self.classes)).astype(float)
        distance = 0.5 * float(np.abs(window / window.sum() - base / base.sum()).sum())
        p = homogeneity_test(window, base)
        mix = ", ".join(
            f"{name_} {share:.0%} (baseline {base_share:.0%})"
            for name_, share, base_share in zip(self.classes, window / window.sum(), base / base.sum(), strict=True)
        )
        violated = p < self.thresholds["alpha"] and distance > self.thresholds["class_mix_min_tvd"]
        return Result(
            name,
            check_type,
            label,
            "VIOLATION" if violated else "OK",
            f"class mix {mix}: total variation distance {distance:.3f} (limit "
            f"{self.thresholds['class_mix_min_tvd']}), chi-square p={p:.2g} (alpha {self.thresholds['alpha']})"
            + (f"; {neither} answers most likely neither left out (see the neither check)" if neither else ""),
        )

    def top_probability(self, probabilities: np.ndarray, label: str) -> Result:
        name, check_type = "top_probability", "baseline_drift_check"
        if skipped := self._too_few(name, check_type, len(probabilities), label):
            return skipped
        top, base = probabilities.max(axis=1), sketch_values(self.statistics, name)
        psi = population_stability_index(top, base)
        distance, p = ks_two_sample(top, base)
        violated = p < self.thresholds["alpha"] and psi > self.thresholds["top_probability_min_psi"]
        return Result(
            name,
            check_type,
            label,
            "VIOLATION" if violated else "OK",
            f"median {np.median(top):.3f} (baseline {np.median(base):.3f}): PSI {psi:.3f} (limit "
            f"{self.thresholds['top_probability_min_psi']}), KS distance {distance:.3f}, p={p:.2g} "
            f"(alpha {self.thresholds['alpha']})",
        )

    def _rate_above_baseline(self, name: str, rate: float, count: int) -> tuple[float, float, float, bool]:
        """The baseline's share of feature `name`, the margin (`<name>_margin`), the one-sided p of `rate` over
        `count` answers exceeding it, and whether it exceeds it by more than the margin, significantly."""
        statistics = feature(self.statistics, name)["numerical_statistics"]
        base_rate, base_count = statistics["mean"], statistics["common"]["num_present"]
        p = one_sided_proportion_test(rate, count, base_rate, base_count)
        margin = self.thresholds[f"{name}_margin"]
        return base_rate, margin, p, p < self.thresholds["alpha"] and rate > base_rate + margin

    def low_confidence(self, probabilities: np.ndarray, label: str) -> Result:
        name, check_type = "low_confidence", "baseline_drift_check"
        if skipped := self._too_few(name, check_type, len(probabilities), label):
            return skipped
        rate = float((probabilities.max(axis=1) < self.threshold).mean())
        base_rate, margin, p, violated = self._rate_above_baseline(name, rate, len(probabilities))
        return Result(
            name,
            check_type,
            label,
            "VIOLATION" if violated else "OK",
            f"{rate:.1%} of answers below the threshold {self.threshold:.3f} (baseline {base_rate:.1%}, "
            f"limit baseline + {margin:.0%}), p={p:.2g} (alpha {self.thresholds['alpha']})",
        )

    def neither(self, probabilities: np.ndarray, label: str) -> Result:
        name, check_type = "neither", "baseline_drift_check"
        if not has_feature(self.statistics, name):
            return Result(
                name,
                check_type,
                label,
                "SKIPPED",
                "the baseline has no neither statistics (it predates answers that may mean neither): rebuild it "
                "with `python -m monitoring baseline`",
            )
        if skipped := self._too_few(name, check_type, len(probabilities), label):
            return skipped
        if probabilities.shape[1] != len(self.classes):
            return Result(
                name, check_type, label, "SKIPPED", "the answers do not hold one probability per class (see prediction)"
            )
        rate = float(neither_most_likely(probabilities).mean())
        mean = float(neither_probability(probabilities).mean())
        base_mean = feature(self.statistics, "neither_probability")["numerical_statistics"]["mean"]
        base_rate, margin, p, violated = self._rate_above_baseline(name, rate, len(probabilities))
        return Result(
            name,
            check_type,
            label,
            "VIOLATION" if violated else "OK",
            f"{rate:.1%} of answers most likely neither (baseline {base_rate:.1%}, limit baseline + {margin:.0%}), "
            f"mean neither probability {mean:.3f} (baseline {base_mean:.3f}), p={p:.2g} "
            f"(alpha {self.thresholds['alpha']})",
        )

    def image_statistic(self, name: str, values: np.ndarray, label: str) -> Result:
        check_type = "baseline_drift_check"
        if skipped := self._too_few(name, check_type, len(values), label):
            return skipped
        if not has_feature(self.statistics, name):
            return Result(
                name,
                check_type,
                label,
                "SKIPPED",
                "the baseline has no such feature: rebuild it with `python -m monitoring baseline`",
            )
        base = sketch_values(self.statistics, name)
        distance, p = ks_two_sample(values, base)
        limit = self.thresholds["image_min_ks_distance"]
        violated = p < self.thresholds["alpha"] and distance > limit
        shares = (
            f"; border brighter than the centre in {np.mean(values > 0):.0%} of images "
            f"(baseline {np.mean(base > 0):.0%})"
            if name == BORDER_FEATURE
            else ""
        )
        return Result(
            name,
            check_type,
            label,
            "VIOLATION" if violated else "OK",
            f"mean {values.mean():.3f} (baseline {base.mean():.3f}){shares}: KS distance {distance:.3f} "
            f"(limit {limit}), p={p:.2g} (alpha {self.thresholds['alpha']})",
        )

    def domain(self, name: str, values: list[str], label: str) -> Result:
        check_type = "categorical_values_check"
        if not values:
            return Result(name, check_type, label, "SKIPPED", "no captured images")
        unknown = [value for value in values if value not in self.domains[name]]
        share, limit = len(unknown) / len(values), self.thresholds["domain_content_threshold"]
        seen = ", ".join(sorted(set(unknown))[:5])
        return Result(
            name,
            check_type,
            label,
            "VIOLATION" if share > limit else "OK",
            f"{share:.1%} of images outside the training domain {self.domains[name]} (limit {limit:.0%})"
            + (f": {seen}" if unknown else ""),
        )

    def parse_failures(self, captures: Captures) -> Result:
        failures, limit = captures.failures, self.thresholds["max_parse_failures"]
        listed = "; ".join(f"{failure.file}:{failure.line}: {failure.reason}" for failure in failures[:10])
        more = f" (and {len(failures) - 10} more)" if len(failures) > 10 else ""
        return Result(
            "capture_record",
            "parse_failure_check",
            "all",
            "VIOLATION" if len(failures) > limit else "OK",
            f"{len(failures)} of {len(captures) + len(failures)} records could not be read"
            + (f": {listed}{more}" if failures else ""),
        )
