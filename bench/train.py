"""Benchmark the default training recipe: `.venv/bin/python bench/train.py`.

Stages the bicycle/motorcycle data from the shared CIFAR-100 archive (with the other vehicle classes,
which the default recipe learns alongside), fits the default recipe with three seeds and writes
bench/results/train.json: per-seed test accuracy, training seconds and coverage at the chosen
threshold, their summary, the recipe and the machine.
"""

import json
import os
import pickle
import platform
import random
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.fit import fit_local  # noqa: E402

ARCHIVE = Path("/work/shared/data/cifar-100-python-vehicles.tar.gz")
RESULTS = ROOT / "bench" / "results" / "train.json"
CLASSES = ("bicycle", "motorcycle")
SEEDS = (0, 1, 2)


def stage(out: Path) -> None:
    """The ETL's layout (10% stratified seeded validation split) plus extra.lst of the other vehicle classes."""
    with tarfile.open(ARCHIVE) as archive:
        def load(name):
            return pickle.load(archive.extractfile(f"cifar-100-python/{name}"), encoding="latin1")
        names = load("meta")["fine_label_names"]
        splits = {"train": load("train"), "test": load("test")}
    extra_classes = sorted({names[fine] for fine in splits["train"]["fine_labels"]} - set(CLASSES))
    manifests = {"train": [], "validation": [], "test": [], "extra": []}
    shuffle = random.Random(0).shuffle
    for label, name in enumerate(CLASSES + tuple(extra_classes)):
        for split, data in splits.items():
            rows = [(file, pixels) for file, pixels, fine in zip(data["filenames"], data["data"], data["fine_labels"])
                    if names[fine] == name]
            if name in extra_classes:
                chosen = {"extra": rows} if split == "train" else {}
            elif split == "train":
                shuffle(rows)
                chosen = {"validation": rows[:len(rows) // 10], "train": rows[len(rows) // 10:]}
            else:
                chosen = {"test": rows}
            for manifest, picked in chosen.items():
                (out / split).mkdir(parents=True, exist_ok=True)
                for file, pixels in picked:
                    Image.fromarray(pixels.reshape(3, 32, 32).transpose(1, 2, 0)).save(out / split / file)
                    manifests[manifest].append((label, f"{split}/{file}"))
    for manifest, rows in manifests.items():
        (out / f"{manifest}.lst").write_text("".join(f"{index}\t{label}\t{path}\n"
                                                     for index, (label, path) in enumerate(rows)))
    (out / "dataset.json").write_text(json.dumps({
        "classes": [{"name": name, "label": label} for label, name in enumerate(CLASSES)],
        "extra_classes": [{"name": name, "label": len(CLASSES) + index} for index, name in enumerate(extra_classes)],
    }, indent=2))


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main() -> None:
    runs = []
    with tempfile.TemporaryDirectory(prefix="scones-bench-") as work:
        data = Path(work) / "data"
        stage(data)
        for seed in SEEDS:
            load_before = os.getloadavg()[0]
            started = time.perf_counter()
            fit_local(data, Path(work) / f"seed{seed}", seed=seed)
            wall_seconds = time.perf_counter() - started
            metrics = json.loads((Path(work) / f"seed{seed}" / "metrics.json").read_text())
            test = metrics["test"]
            runs.append({
                "seed": seed,
                "test_accuracy": test["accuracy"],
                "validation_accuracy": metrics["validation"]["accuracy"],
                "train_seconds": round(metrics["train_seconds"], 1),
                "fit_wall_seconds": round(wall_seconds, 1),
                "threshold": metrics["threshold"],
                "test_coverage_at_threshold": test["at_threshold"]["coverage"],
                "test_accuracy_at_threshold": test["at_threshold"]["accuracy"],
                "test_at_classic_thresholds": test["at_classic_thresholds"],
                "test_ece_before_temperature": test["ece_before_temperature"],
                "test_ece_after_temperature": test["ece_after_temperature"],
                "load_average_1min_before": load_before,
            })
            print(f"seed {seed}: test accuracy {test['accuracy']:.3f}, trained in {metrics['train_seconds']:.0f}s, "
                  f"coverage {test['at_threshold']['coverage']:.0%} at threshold {metrics['threshold']:.4f}",
                  file=sys.stderr)
    accuracies = [run["test_accuracy"] for run in runs]
    hyperparameters = dict(metrics["hyperparameters"])
    del hyperparameters["seed"]
    results = {
        "benchmark": "default training recipe, bicycle vs motorcycle, CIFAR-100 test split (100 images)",
        "command": ".venv/bin/python bench/train.py",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": metrics["recipe"],
        "hyperparameters": hyperparameters,
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
    partial = RESULTS.with_suffix(".json.tmp")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(partial, RESULTS)
    print(json.dumps({key: results[key] for key in ("test_accuracy_mean", "test_accuracy_min",
                                                    "train_seconds_median", "test_coverage_at_threshold_mean")}))


if __name__ == "__main__":
    main()
