"""Score the default recipe's model on real photographs: `.venv/bin/python bench/realphotos.py`.

    .venv/bin/python bench/realphotos.py [--seeds 0,1,2] [--jobs 1|2] [--keep DIR]
    .venv/bin/python bench/realphotos.py --model PATH/model.tar.gz [PATH/model.tar.gz ...]

Without `--model`: stages the CIFAR-100 data as `make run` does (`training.etl.demo_source()`, every other class
of the archive after bicycle and motorcycle), fits the default recipe once per seed with `training.fit.fit_local`
(`--jobs` at a time, as `bench/train.py --jobs` does) and scores each model. With `--model`: scores the given
archives only, however they were trained.

A model is scored by `training.photo_check` (its docstring defines the figures) on each photo of
`../shared/data/real-photos-dev/` (bicycle/, motorcycle/, car/, other/), through the model's own serving code, as
the endpoint serves it; with the CIFAR test accuracy from its metrics.json and the p50 latency of input_fn +
predict_fn per photo (informational: the machine is shared). The names of the photos a model gets wrong, and of
the cars and others it accepts, are listed (relative to real-photos-dev). Writes bench/results/realphotos.json
(`--out`). The photos are for measuring only: nothing here trains on them.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.train import machine  # noqa: E402
from training import etl  # noqa: E402
from training.fit import fit_local  # noqa: E402
from training.photo_check import (  # noqa: E402, F401
    TARGETS,
    accepted_shares,
    answer,
    at_threshold,
    read_photos,
    score,
    share,
    three_way,
)

RESULTS = ROOT / "bench" / "results" / "realphotos.json"
PHOTOS = etl.SHARED_REAL_PHOTOS
FOLDERS = (*TARGETS, "car", "other")
# Issue 23's goals, checked on every seed (the worst one decides).
GOALS = {
    "right": (">=", 0.97),
    "accepted_right": (">=", 0.99),
    "accepted": (">=", 0.85),
    "car_accepted": ("<=", 0.02),
    "other_accepted": ("<=", 0.02),
    "cifar_test_accuracy": (">=", 0.93),
}


def seeds(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are integers separated by commas; got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"give at least one seed, each once; got {text!r}")
    return values


def headline(run: dict) -> dict:
    """The figures summarised over runs and checked against the goals."""
    at = run["at_model_threshold"]
    return {
        "right": run["right"],
        "right_two_way": run["right_two_way"],
        "bicycle_right": run["bicycle_right"],
        "motorcycle_right": run["motorcycle_right"],
        **accepted_shares(at),
        **{
            f"{name}_at_{classic['threshold']:.2f}": classic[name]
            for classic in run["at_classic_thresholds"]
            for name in ("accepted", "accepted_right", "car_accepted", "other_accepted")
        },
        "threshold": run["threshold"],
        "cifar_test_accuracy": run["cifar_test_accuracy"],
        "latency_ms_p50": run["latency_ms_p50"],
    }


def summary(runs: list[dict]) -> dict:
    rows = [headline(run) for run in runs]
    out = {}
    for key in rows[0]:
        values = [row[key] for row in rows if row[key] is not None]
        out[key] = {
            "mean": round(statistics.mean(values), 4) if values else None,
            "min": round(min(values), 4) if values else None,
            "max": round(max(values), 4) if values else None,
        }
    return out


def goals(runs: list[dict]) -> dict:
    rows = [headline(run) for run in runs]
    checked = {}
    for key, (sense, bound) in GOALS.items():
        values = [row[key] for row in rows]
        met = all(v is not None and (v >= bound if sense == ">=" else v <= bound) for v in values)
        checked[key] = {"goal": f"{sense} {bound}", "per_run": values, "met_by_every_run": met}
    return checked


def recurring(runs: list[dict], key: str) -> dict[str, int]:
    """File name -> in how many runs it appears under `key`, most frequent first."""
    counts: dict[str, int] = {}
    for run in runs:
        for item in run[key]:
            counts[item["file"]] = counts.get(item["file"], 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def fit_seed(data: Path, out: Path, seed: int) -> Path:
    started = time.perf_counter()
    archive = fit_local(data, out, seed=seed)
    print(f"seed {seed}: fitted in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    return archive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=seeds, default=[0, 1, 2], help="fits of the default recipe (default 0,1,2)")
    parser.add_argument(
        "--model", type=Path, nargs="+", metavar="MODEL_TAR_GZ", help="score these archives instead of fitting"
    )
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=1, help="fits at once (default 1)")
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="keep each fitted seed's model and report in DIR/seedN (to rescore)"
    )
    parser.add_argument("--photos", type=Path, default=PHOTOS, help=f"default {PHOTOS}")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    if not all((args.photos / label).is_dir() for label in FOLDERS):
        print(
            f"no real photos at {args.photos} (bicycle/, motorcycle/, car/, other/): nothing to score", file=sys.stderr
        )
        return 1
    for archive in args.model or []:
        if not archive.is_file():
            print(f"no model archive {archive}", file=sys.stderr)
            return 1
    photos = read_photos(args.photos)
    print(f"{len(photos)} photos in {args.photos}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="scones-bench-realphotos-") as work:
        if args.model:
            archives, labels = args.model, [f"model{index}" for index in range(len(args.model))]
            source = staged = None
        else:
            # As `make run` stages it (local/__main__.py, LocalRun.stage), without the bucket.
            data, source = Path(work) / "data", etl.demo_source()
            staged = etl.stage(source, data, extra_classes=etl.ALL_OTHERS, progress=False).dataset
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))  # read by train.py
            with ThreadPoolExecutor(args.jobs) as pool:
                archives = list(
                    pool.map(lambda seed: fit_seed(data, (args.keep or Path(work)) / f"seed{seed}", seed), args.seeds)
                )
            labels = [f"seed{seed}" for seed in args.seeds]
        runs = []
        for archive, label in zip(archives, labels, strict=True):
            run = score(archive, photos, label)
            del run["answers"]  # each photo's answer: the listed wrong and accepted ones are enough here
            if not args.model:
                run["seed"] = int(label.removeprefix("seed"))
                run["model"] = f"default recipe, seed {run['seed']} (fitted by this run)"
            runs.append(run)
            at = run["at_model_threshold"]
            print(
                f"{label}: right {run['right']:.3f} (two-way {run['right_two_way']:.3f}); at threshold "
                f"{run['threshold']:.3f} accepted {at['accepted']:.0%}, right {at['accepted_right'] or 0:.1%}; "
                f"cars accepted {at['car_accepted']:.0%}, others {at['other_accepted']:.0%}",
                file=sys.stderr,
                flush=True,
            )

    command = ".venv/bin/python bench/realphotos.py"
    if args.model:
        command += " --model " + " ".join(str(path) for path in args.model)
    else:
        command += f" --seeds {','.join(map(str, args.seeds))}" + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
        command += f" --keep {args.keep}" if args.keep else ""
    results = {
        "benchmark": "the default recipe's model on real-photos-dev, served through its own code/inference.py",
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "photos": str(args.photos),
        "cifar_source": None if args.model else str(source),
        "staged_classes": staged and [entry["name"] for entry in staged["classes"] + staged["extra_classes"]],
        "recipe": runs[0]["recipe"],
        "hyperparameters": {k: v for k, v in (runs[0]["hyperparameters"] or {}).items() if k != "seed"},
        "precision": runs[0]["precision"],
        "summary": summary(runs),
        "goals": goals(runs),
        "wrong_in_runs": recurring(runs, "wrong"),
        "non_vehicles_accepted_in_runs": recurring(runs, "non_vehicles_accepted"),
        "runs": runs,
        "machine": machine(),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    etl.write_file(args.out, (json.dumps(results, indent=2) + "\n").encode())
    print(json.dumps({key: value["mean"] for key, value in results["summary"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
