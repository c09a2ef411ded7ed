"""Time the capture reader: `.venv/bin/python bench/monitor.py`.

Builds 50,000 Model Monitor capture records from real CIFAR-100 images of the shared archive (PNG, base64 as
SageMaker writes them, answers as JSON strings) in .jsonl files across ten hour folders of a temporary
folder, then reads them all with `monitoring.captures.read_captures` (JSON, base64 and PNG decoding, image
statistics) REPEATS times, and once builds the whole report (checks, pictures, HTML) against a baseline
made from the same images. Medians and the goal go to bench/results/monitor.json.
"""

import base64
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402
from monitoring import baseline, checks, report  # noqa: E402
from monitoring.captures import read_captures  # noqa: E402
from training import etl  # noqa: E402
from training.etl import SHARED_ARCHIVE  # noqa: E402

SOURCE = Path(os.environ.get("SCONES_CIFAR100", SHARED_ARCHIVE))
RESULTS = ROOT / "bench" / "results" / "monitor.json"
RECORDS = 50_000
HOURS = 10
FILES_PER_HOUR = 10
REPEATS = 3
GOAL_RECORDS_PER_SECOND = 5_000


def capture_line(png: bytes, answer: list[float], moment: datetime.datetime) -> str:
    return json.dumps(
        {
            "captureData": {
                "endpointInput": {
                    "observedContentType": "image/png",
                    "mode": "INPUT",
                    "data": base64.b64encode(png).decode("ascii"),
                    "encoding": "BASE64",
                },
                "endpointOutput": {
                    "observedContentType": "application/json",
                    "mode": "OUTPUT",
                    "data": json.dumps(answer),
                    "encoding": "JSON",
                },
            },
            "eventMetadata": {"eventId": str(uuid.uuid4()), "inferenceTime": moment.strftime("%Y-%m-%dT%H:%M:%SZ")},
            "eventVersion": "0",
        },
        separators=(",", ":"),
    )


def write_captures(folder: Path) -> tuple[int, int]:
    """RECORDS records of real bicycle and motorcycle images; answers (files, bytes)."""
    archive = etl.read_archive(SOURCE)
    rows = np.flatnonzero(
        np.isin(archive.train.fine_labels, [archive.fine_label_names.index(name) for name in ("bicycle", "motorcycle")])
    )
    pngs = [etl.png_bytes(archive.train.data[row]) for row in rows]
    rng = np.random.default_rng(0)
    bicycle = rng.beta(2, 2, RECORDS)
    start = datetime.datetime(2026, 11, 25, 0, tzinfo=datetime.UTC)
    per_file = RECORDS // (HOURS * FILES_PER_HOUR)
    total_bytes = 0
    for file_number in range(HOURS * FILES_PER_HOUR):
        first = start + datetime.timedelta(seconds=file_number * 3600 / FILES_PER_HOUR)
        path = folder / f"{first:%Y/%m/%d/%H}" / f"{first:%M-%S}-000-{uuid.uuid4()}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for index in range(file_number * per_file, (file_number + 1) * per_file):
            moment = first + datetime.timedelta(seconds=(index % per_file) * 360 / per_file)
            lines.append(capture_line(pngs[index % len(pngs)], [bicycle[index], 1 - bicycle[index]], moment))
        content = "\n".join(lines) + "\n"
        path.write_text(content)
        total_bytes += len(content)
    return HOURS * FILES_PER_HOUR, total_bytes


def fake_baseline(captures) -> tuple[dict, dict]:
    """A baseline of the same records' numbers, shaped as baseline.py writes it (no model needed here)."""
    top = captures.probabilities.max(axis=1)
    classes = ["bicycle", "motorcycle"]
    predicted = [classes[index] for index in captures.probabilities.argmax(axis=1)]
    features = [
        baseline.categorical_feature("prediction", predicted, classes),
        baseline.numerical_feature("top_probability", top),
        baseline.numerical_feature("low_confidence", (top < 0.9).astype(float), "Integral"),
    ]
    for statistic, values in (("mean", captures.channel_means), ("std", captures.channel_stds)):
        for channel, name in enumerate(baseline.CHANNELS):
            features.append(baseline.numerical_feature(f"image_{statistic}_{name}", values[:, channel]))
    features.append(baseline.numerical_feature(checks.BORDER_FEATURE, captures.border_minus_centre))
    features += [
        baseline.categorical_feature("image_size", captures.sizes),
        baseline.categorical_feature("image_format", captures.formats),
    ]
    statistics_ = {
        "version": 0,
        "dataset": {"item_count": len(top), "image_count": len(top)},
        "model": {"classes": classes, "threshold": 0.9, "temperature": 1.0},
        "features": features,
    }
    return statistics_, baseline.constraints_of(statistics_)


def machine() -> dict:
    cpu = cpu_name()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "load_average_1m_at_start": os.getloadavg()[0],
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="monitor-bench-") as folder:
        captures_dir, out = Path(folder) / "data_capture", Path(folder) / "report"
        files, size = write_captures(captures_dir)
        runs = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            captures = read_captures(str(captures_dir), progress=False)
            runs.append(time.perf_counter() - started)
            assert len(captures) == RECORDS and not captures.failures
        statistics_, constraints = fake_baseline(captures)
        started = time.perf_counter()
        summary = report.build(captures, statistics_, constraints, out, "1h", str(captures_dir))
        report_seconds = time.perf_counter() - started
    median = statistics.median(runs)
    results = {
        "what": f"monitoring.captures.read_captures over {RECORDS} capture records of real CIFAR-100 PNGs "
        f"(base64, JSON answers) in {files} .jsonl files across {HOURS} hour folders on local disk: "
        "JSON, base64 and PNG decoding and per-image statistics; processes over files "
        f"({min(os.cpu_count() or 1, files)} workers); then checks + pictures + HTML of the full report",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "records": RECORDS,
        "files": files,
        "megabytes": round(size / 1e6, 1),
        "goal_records_per_second": GOAL_RECORDS_PER_SECOND,
        "read_seconds": [round(run, 3) for run in runs],
        "read_median_seconds": round(median, 3),
        "records_per_second_median": round(RECORDS / median),
        "goal_met": RECORDS / median >= GOAL_RECORDS_PER_SECOND,
        "report_build_seconds": round(report_seconds, 3),
        "report_windows": summary["windows"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
