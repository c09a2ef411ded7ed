"""The capture report: checks per time window, pictures, and one self-contained report.html."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from monitoring import checks, reviews
from monitoring.baseline import write_file
from monitoring.captures import CaptureError, Captures, NoCaptures

WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
GRID_COLUMNS = 8
REVIEWS_PICTURE = "reviews_by_model_class.png"


class ReportError(Exception):
    """The report cannot be written where asked; the CLI prints it as one line."""


def prepare_out(out: Path) -> None:
    """Create the report folder and try writing in it, so that a folder one cannot write to fails at once, not
    after the captures were read. A trial file, not the permission bits: root ignores those, not a read-only mount."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"cannot write the report into {out}: it is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ReportError(f"cannot write the report into {out}: {error.strerror or error}") from None


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    rows: np.ndarray

    @property
    def label(self) -> str:
        return f"{iso(self.start)}/{iso(self.end)}"


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def window_seconds(text: str) -> int:
    """Seconds of a window length such as 1h, 30m, 1d."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"window {text!r} is not a length such as 30m, 1h or 1d")
    return int(match.group(1)) * WINDOW_UNITS[match.group(2)]


def windows_of(times: np.ndarray, seconds: int) -> list[Window]:
    """Windows aligned on multiples of `seconds` since the epoch (hours start on the hour), non-empty only."""
    starts = np.floor(times / seconds) * seconds
    return [
        Window(float(start), float(start + seconds), np.flatnonzero(starts == start)) for start in np.unique(starts)
    ]


# ----------------------------------------------------------------------------------------------- report


def build(
    captures: Captures,
    statistics: dict,
    constraints: dict,
    out: Path,
    window: str = "1h",
    source: str = "",
    filter_threshold: float | None = None,
    reviewed: reviews.Reviews | None = None,
) -> dict:
    """Check every window, write the report files under `out`; answers summary.json's content.
    `filter_threshold`: the threshold the workflow's filter applied, if known (named in the report).
    `reviewed`: the reviewers' answers, summarised in the report's Reviews section (without: none yet)."""
    if not len(captures):
        if not captures.failures:
            raise NoCaptures(f"no capture records under {source} in the time range asked")
        raise CaptureError(f"no capture records could be read under {source} ({len(captures.failures)} unreadable)")
    checker = checks.Checker(statistics, constraints)
    if not captures.probabilities.shape[1]:  # the endpoint captured its input only: no answer to check or plot
        captures.probabilities = np.full((len(captures), len(checker.classes)), np.nan)
    windows = windows_of(captures.times, window_seconds(window))
    results = [result for each in windows for result in checker.window(captures, each.rows, each.label)]
    results.append(checker.parse_failures(captures))
    violations = [result.as_violation() for result in results if result.status == "VIOLATION"]

    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "constraint_violations.json", (json.dumps({"violations": violations}, indent=2) + "\n").encode())
    pictures = {
        "top_probability_histogram.png": plot_top_probability(captures, statistics),
        "confidence_over_time.png": plot_confidence_over_time(captures, checker.threshold, filter_threshold),
        "class_mix_over_time.png": plot_class_mix(captures, windows, checker.classes),
        "low_confidence_over_time.png": plot_low_confidence(captures, windows, statistics, checker),
        "neither_over_time.png": plot_neither(captures, windows, statistics, checker),
        "lowest_confidence_images.png": plot_lowest_images(captures, checker.classes),
    }
    answers = answered(captures.probabilities)
    for name, png in pictures.items():
        write_file(out / name, png)
    summary = {
        "source": source,
        "window": window,
        "records": len(captures),
        "files": captures.files,
        "unreadable_records": len(captures.failures),
        "first_record": iso(captures.times.min()),
        "last_record": iso(captures.times.max()),
        "windows": len(windows),
        "answered_records": len(answers),
        # share of the answers whose "neither" (1 - sum of the class probabilities) is the most likely
        "neither_share": float(checks.neither_most_likely(answers).mean()) if len(answers) else None,
        "model_threshold": checker.threshold,
        "filter_threshold": filter_threshold,
        "violations": len(violations),
        "checks": summary_rows(results),
        "results": [asdict(result) for result in results],
    }
    reviews_picture = None
    if reviewed is not None:
        summary["reviews"] = reviews.summarise(reviewed, checker.classes)
        if summary["reviews"]["answers"]:
            reviews_picture = png_of(reviews.chart(summary["reviews"]))
            write_file(out / REVIEWS_PICTURE, reviews_picture)
    write_file(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    write_file(out / "report.html", render_html(summary, pictures, reviews_picture).encode())
    return summary


def summary_rows(results: list[checks.Result]) -> list[dict]:
    """One row per check: VIOLATION if any window violates it, with the worst window's numbers."""
    rows = {}
    for result in results:
        row = rows.setdefault(
            (result.feature_name, result.constraint_check_type),
            {
                "feature_name": result.feature_name,
                "check": result.constraint_check_type,
                "status": "SKIPPED",
                "windows_checked": 0,
                "windows_violated": 0,
                "window": result.window,
                "description": result.description,
            },
        )
        if result.status == "SKIPPED":
            continue
        row["windows_checked"] += 1
        first_violation = result.status == "VIOLATION" and row["status"] != "VIOLATION"
        if first_violation or row["status"] == "SKIPPED":
            row.update(status=result.status, window=result.window, description=result.description)
        row["windows_violated"] += result.status == "VIOLATION"
    return list(rows.values())


# --------------------------------------------------------------------------------------------- pictures


def png_of(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def answered(probabilities: np.ndarray) -> np.ndarray:
    """The rows of records that hold a whole answer."""
    return probabilities[~np.isnan(probabilities).any(axis=1)] if probabilities.size else probabilities


def top_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Each record's highest probability; NaN for a record without an answer (no warning about it)."""
    answered = ~np.isnan(probabilities).all(axis=1)
    top = np.full(len(probabilities), np.nan)
    top[answered] = np.nanmax(probabilities[answered], axis=1)
    return top


def _window_times(windows: list[Window]) -> list[datetime]:
    return [datetime.fromtimestamp(each.start, UTC) for each in windows]


def plot_top_probability(captures: Captures, statistics: dict) -> bytes:
    top = top_probabilities(captures.probabilities)
    top = top[~np.isnan(top)]
    base = checks.sketch_values(statistics, "top_probability")
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    bins = np.linspace(min(base.min(), top.min(initial=1)), 1, 26)
    axis.hist(base, bins=bins, density=True, alpha=0.5, label=f"baseline (validation, {len(base)})")
    if len(top):  # an endpoint that captures its input only has no answers to draw
        axis.hist(top, bins=bins, density=True, histtype="step", linewidth=2, label=f"captured ({len(top)})")
    axis.set(title="top probability", xlabel="probability of the predicted class", ylabel="density")
    axis.legend()
    return png_of(figure)


def plot_confidence_over_time(captures: Captures, threshold: float, filter_threshold: float | None = None) -> bytes:
    top = top_probabilities(captures.probabilities)
    moments = [datetime.fromtimestamp(time, UTC) for time in captures.times]
    figure, axis = plt.subplots(figsize=(9, 3.6))
    axis.scatter(moments, top, s=6, alpha=0.5, color=np.where(top < threshold, "tab:red", "tab:blue"))
    axis.axhline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    if filter_threshold is not None and filter_threshold != threshold:
        axis.axhline(filter_threshold, color="tab:orange", linestyle=":", label=f"filter's {filter_threshold:.3f}")
    axis.set(title="confidence over time (red: below the threshold)", ylabel="top probability", xlabel="time (UTC)")
    axis.legend(loc="lower left")
    figure.autofmt_xdate()
    return png_of(figure)


def plot_class_mix(captures: Captures, windows: list[Window], classes: list[str]) -> bytes:
    """Per window, the share of answers of each class and of those most likely neither."""
    figure, axis = plt.subplots(figsize=(9, 3.6))
    shares = []
    for each in windows:
        rows = answered(captures.probabilities[each.rows])
        counts = np.zeros(len(classes) + 1)
        if len(rows):
            neither = checks.neither_most_likely(rows)
            named = np.bincount(rows[~neither].argmax(axis=1), minlength=len(classes))[: len(classes)]
            counts = np.append(named, neither.sum())
        shares.append(counts / max(1, len(rows)))
    shares = np.array(shares).reshape(len(windows), len(classes) + 1)
    positions = np.arange(len(windows))
    bottom = np.zeros(len(windows))
    for index, name in enumerate([*classes, "neither"]):
        color = "tab:gray" if index == len(classes) else None
        axis.bar(positions, shares[:, index], bottom=bottom, label=name, color=color)
        bottom += shares[:, index]
    axis.set_xticks(positions, [f"{moment:%m-%d %H:%M}" for moment in _window_times(windows)], rotation=30)
    axis.set(title="predicted class mix per window", ylabel="share of answers", ylim=(0, 1))
    axis.legend(loc="upper right")
    return png_of(figure)


def plot_low_confidence(captures: Captures, windows: list[Window], statistics: dict, checker) -> bytes:
    top = top_probabilities(captures.probabilities)
    rates = [float(np.mean(top[each.rows] < checker.threshold)) for each in windows]
    title = f"answers below the threshold {checker.threshold:.3f} per window"
    return _rate_per_window(windows, rates, statistics, checker, "low_confidence", title)


def plot_neither(captures: Captures, windows: list[Window], statistics: dict, checker) -> bytes:
    shares = []
    for each in windows:
        rows = answered(captures.probabilities[each.rows])
        shares.append(float(checks.neither_most_likely(rows).mean()) if len(rows) else np.nan)
    title = "answers most likely neither (1 - sum above every class) per window"
    return _rate_per_window(windows, shares, statistics, checker, "neither", title)


def _rate_per_window(windows: list[Window], rates: list[float], statistics: dict, checker, name: str, title: str):
    """A window's share of answers against the baseline's share of feature `name` and its drift limit."""
    figure, axis = plt.subplots(figsize=(9, 3.6))
    positions = np.arange(len(windows))  # as the class mix's bars: one window alone is not spread over years
    axis.plot(positions, rates, "o-", label="captured")
    if checks.has_feature(statistics, name):  # a baseline written before "neither" has no share to draw
        base = checks.feature(statistics, name)["numerical_statistics"]["mean"]
        axis.axhline(base, color="tab:green", label=f"baseline {base:.0%}")
        limit = base + checker.thresholds[f"{name}_margin"]
        axis.axhline(limit, color="tab:red", linestyle="--", label="baseline + margin")
    axis.set_xticks(positions, [f"{moment:%m-%d %H:%M}" for moment in _window_times(windows)], rotation=30)
    axis.set(title=title, ylabel="share of answers", ylim=(0, 1.05))
    axis.legend(loc="upper left")
    return png_of(figure)


def plot_lowest_images(captures: Captures, classes: list[str]) -> bytes:
    kept = captures.lowest
    rows = max(1, -(-len(kept) // GRID_COLUMNS))
    neither = [checks.neither_probability(np.array([capture.probabilities]))[0] for capture in kept]
    title_lines = len(classes) + any(neither)
    figure, axes = plt.subplots(
        rows, GRID_COLUMNS, figsize=(1.4 * GRID_COLUMNS, (1.35 + 0.17 * title_lines) * rows), squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    for axis, capture, its_neither in zip(axes.flat, kept, neither, strict=False):
        with Image.open(io.BytesIO(capture.image)) as image:
            axis.imshow(np.asarray(image.convert("RGB")))
        answer = "\n".join(
            f"{name[:4]} {value:.2f}" for name, value in zip(classes, capture.probabilities, strict=True)
        )
        answer += f"\nneit {its_neither:.2f}" if its_neither else ""
        axis.set_title(answer, fontsize=7)
    figure.suptitle("lowest-confidence captured images" if kept else "no captured images", fontsize=10)
    return png_of(figure)


# ------------------------------------------------------------------------------------------------ html


def thresholds(summary: dict) -> str:
    """Which threshold the filter applied, and which the checks use."""
    model, applied = summary["model_threshold"], summary.get("filter_threshold")
    if applied is None:
        return f" The checks count the answers below the model's own threshold, {model:.3f}."
    if applied == model:
        return f" The workflow's filter applied the model's own threshold, {applied:.3f}."
    return (
        f" The workflow's filter applied the threshold {applied:.3f}; the checks use the model's own, {model:.3f}, "
        "which its baseline was computed with."
    )


def neither_share(summary: dict) -> str:
    if not summary["answered_records"]:
        return ""
    return f" Of {summary['answered_records']} answers, {summary['neither_share']:.1%} were most likely neither."


STYLE = """body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top;font-size:.9em}
.OK{background:#e3f6e3}.VIOLATION{background:#fbe0e0;font-weight:bold}.SKIPPED{background:#eee}img{max-width:100%}"""


def img(name: str, png: bytes) -> str:
    return (
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
    )


def render_html(summary: dict, pictures: dict[str, bytes], reviews_picture: bytes | None = None) -> str:
    escape = html.escape
    verdict = f"{summary['violations']} violation(s)" if summary["violations"] else "no violation"
    rows = "".join(
        f"<tr><td>{escape(row['feature_name'])}</td><td>{escape(row['check'])}</td>"
        f'<td class="{row["status"]}">{row["status"]}</td>'
        f"<td>{row['windows_violated']} of {row['windows_checked']}</td><td>{escape(row['window'])}</td>"
        f"<td>{escape(row['description'])}</td></tr>"
        for row in summary["checks"]
    )
    violations = "".join(
        f"<tr><td>{escape(result['window'])}</td><td>{escape(result['feature_name'])}</td>"
        f"<td>{escape(result['description'])}</td></tr>"
        for result in summary["results"]
        if result["status"] == "VIOLATION"
    )
    images = "".join(img(name, png) for name, png in pictures.items())
    review_section = reviews.section_html(
        summary.get("reviews"), img(REVIEWS_PICTURE, reviews_picture) if reviews_picture else ""
    )
    counts = Counter(result["status"] for result in summary["results"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Capture report: {verdict}</title><style>{STYLE}</style></head>
<body><h1>Capture report: {verdict}</h1>
<p>{summary["records"]} records from {summary["files"]} files under {escape(summary["source"])},
{summary["first_record"]} to {summary["last_record"]}, in {summary["windows"]} window(s) of {summary["window"]};
{summary["unreadable_records"]} unreadable. Checks: {counts["OK"]} OK, {counts["VIOLATION"]} VIOLATION,
{counts["SKIPPED"]} SKIPPED.{neither_share(summary)}{thresholds(summary)}</p>
<h2>Summary</h2>
<table><tr><th>feature</th><th>check</th><th>status</th><th>windows violated</th><th>window shown</th>
<th>numbers</th></tr>{rows}</table>
{
        f"<h2>Violations</h2><table><tr><th>window</th><th>feature</th><th>numbers</th></tr>{violations}</table>"
        if violations
        else ""
    }
{review_section}
<h2>Pictures</h2>{images}
</body></html>
"""
