"""Time `make run` from an empty state, stage by stage: `.venv/bin/python bench/run.py`.

Needs `make synth` (cdk.out). Each repeat runs `python -m local up` in-process with a fresh state folder
(new local AWS, staging, training, deployment, endpoint, 100 executions, capture report) and stops its
services after. Writes the per-stage medians to bench/results/run.json; the goal is under 8 minutes.
"""

import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from local.__main__ import down, up  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "run.json"
REPEATS = 3


def one_run() -> dict:
    with tempfile.TemporaryDirectory(prefix="run-bench-") as folder:
        state = Path(folder) / ".scones"
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(open(os.devnull, "w")):
                summary = up(state, ROOT / "cdk.out", "dev", concurrency=8)
        finally:
            down(state)
        return {**summary, "total_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    if not (ROOT / "cdk.out" / "manifest.json").exists():
        sys.exit("no cdk.out: run `make synth` first")
    environment = dict(os.environ)
    runs = []
    for _ in range(REPEATS):
        runs.append(one_run())
        os.environ.clear()
        os.environ.update(environment)
    stages = runs[0]["timings_s"]
    result = {
        "what": "python -m local up from an empty state folder (installation and synth not counted)",
        "goal": "under 8 minutes",
        "repeats": REPEATS,
        "median_total_s": statistics.median(run["total_s"] for run in runs),
        "median_stage_s": {stage: statistics.median(run["timings_s"][stage] for run in runs) for stage in stages},
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average": os.getloadavg()},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    RESULTS.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({key: result[key] for key in ("median_total_s", "median_stage_s")}, indent=2))


if __name__ == "__main__":
    main()
