"""Benchmark the default training recipe: `.venv/bin/python bench/train.py`.

Stages the data as `make run` does (`training.etl`: bicycle and motorcycle, and every other class of the shared
CIFAR-100 archive with non-vehicle classes, which the default recipe learns as neither), fits the default recipe with
three seeds and writes bench/results/train.json: per-seed test accuracy, training seconds and coverage
at the chosen threshold, their summary, the recipe and the machine. The machine is shared, so each run
also records its CPU seconds and the load average it started under.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402
from training import etl  # noqa: E402
from training.fit import fit_local  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "train.json"
SEEDS = (0, 1, 2)


def machine() -> dict:
    cpu = cpu_name()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads_per_fit": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def run_seed(data: Path, out: Path, seed: int) -> tuple[dict, dict]:
    """Fit the default recipe with `seed`; answers the run's figures and its metrics.json."""
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    fit_local(data, out, seed=seed)
    wall_seconds = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    print(
        f"seed {seed}: test accuracy {test['accuracy']:.3f}, trained in {metrics['train_seconds']:.0f}s, "
        f"coverage {test['at_threshold']['coverage']:.0%} at threshold {metrics['threshold']:.4f}",
        file=sys.stderr,
    )
    return {
        "seed": seed,
        "test_accuracy": test["accuracy"],
        "validation_accuracy": metrics["validation"]["accuracy"],
        "train_seconds": round(metrics["train_seconds"], 1),
        "train_cpu_seconds": round(metrics["train_cpu_seconds"], 1),
        "fit_wall_seconds": round(wall_seconds, 1),
        "threshold": metrics["threshold"],
        "test_coverage_at_threshold": test["at_threshold"]["coverage"],
        "test_accuracy_at_threshold": test["at_threshold"]["accuracy"],
        "test_at_classic_thresholds": test["at_classic_thresholds"],
        "test_ece_before_temperature": test["ece_before_temperature"],
        "test_ece_after_temperature": test["ece_after_temperature"],
        "load_average_1min_before": load_before,
    }, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--jobs",
        type=int,
        choices=range(1, len(SEEDS) + 1),
        default=1,
        help="seeds fitted at once, one thread each (default 1: one after the other, as timed "
        "figures need); more gives the accuracy figures sooner on a busy machine",
    )
    jobs = parser.parse_args().jobs
    if jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # read by each fit's train.py
    with tempfile.TemporaryDirectory(prefix="scones-bench-train-") as work:
        data = Path(work) / "data"
        source = etl.demo_source()
        staged = etl.stage(source, data, extra_classes=etl.ALL_OTHERS, progress=False).dataset
        with ThreadPoolExecutor(jobs) as pool:
            fitted = list(pool.map(lambda seed: run_seed(data, Path(work) / f"seed{seed}", seed), SEEDS))
    runs = [run for run, _ in fitted]
    metrics = fitted[0][1]
    accuracies = [run["test_accuracy"] for run in runs]
    hyperparameters = dict(metrics["hyperparameters"])
    del hyperparameters["seed"]
    results = {
        "benchmark": "default training recipe, bicycle vs motorcycle, CIFAR-100 test split (100 images)",
        "command": f".venv/bin/python bench/train.py{f' --jobs {jobs}' if jobs > 1 else ''}",
        "jobs": jobs,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": metrics["recipe"],
        "hyperparameters": hyperparameters,
        "precision": metrics["precision"],
        "source": source.name if source else "the cached or downloaded official archive",
        "staged_classes": [entry["name"] for entry in staged["classes"] + staged["extra_classes"]],
        "train_images": metrics["train_images"],
        "runs": runs,
        "test_accuracy_mean": statistics.mean(accuracies),
        "test_accuracy_min": min(accuracies),
        "train_seconds_median": statistics.median(run["train_seconds"] for run in runs),
        "fit_wall_seconds_median": statistics.median(run["fit_wall_seconds"] for run in runs),
        "test_coverage_at_threshold_mean": statistics.mean(run["test_coverage_at_threshold"] for run in runs),
        "machine": machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    etl.write_file(RESULTS, (json.dumps(results, indent=2) + "\n").encode())
    print(
        json.dumps(
            {
                key: results[key]
                for key in (
                    "test_accuracy_mean",
                    "test_accuracy_min",
                    "train_seconds_median",
                    "test_coverage_at_threshold_mean",
                )
            }
        )
    )


if __name__ == "__main__":
    main()
