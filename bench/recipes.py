"""Compare training recipes of the 32-px network (`--architecture resnet9`) by cross-validation:
`.venv/bin/python bench/recipes.py [RECIPE ...]`.

A recipe is `NAME=HYPERPARAMETERS`, e.g. `'long=--epochs 100'`; without any, the float32 and bfloat16 defaults
(`train.AUTO`) and the two others of the README's first cross-validation table.
Stages the shared archive's ten vehicle classes with `training.etl`, deals the 1000 bicycle and motorcycle
images of its training and validation splits into 10 stratified folds of 100, and fits each recipe with
`training.fit` once per fold (`--folds`, default the first 6; the seed is the fold's number plus `--first-seed`,
default 0), that fold as the validation split and no test split: the test images stay unseen, so a choice made
here is not tuned on them. Fitting the same recipe with another `--first-seed` shows how far the seed alone
moves the figures.
Reports per recipe the mean validation accuracy and loss (on 100 images the loss tells recipes apart better than
the accuracy) and the median training time. Fits run `--jobs` at a time, one thread each, so times compare
recipes with each other, not with `bench/train.py`. Writes bench/results/recipes.json.
"""

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training import etl, train  # noqa: E402
from training.data import read_manifest  # noqa: E402
from training.etl import SHARED_ARCHIVE, VEHICLE_EXTRA_CLASSES as EXTRA_CLASSES  # noqa: E402
from training.fit import fit_local  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "recipes.json"
FOLDS = 10
DEFAULT_RECIPES = tuple(
    f"{name}=--epochs {epochs} --extra_fraction {share}"
    for name, epochs, share in (
        ("float32_default", *train.AUTO["float32"].values()),
        ("longer", 100, 0.25),
        ("all_extras", 42, 1.0),
        ("bfloat16_default", *train.AUTO["bfloat16"].values()),
    )
)


def recipe(text: str) -> tuple[str, dict]:
    name, _, arguments = text.partition("=")
    words = shlex.split(arguments)
    if not name or len(words) % 2 or not all(word.startswith("--") for word in words[::2]):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=--hyperparameter value ...")
    return name, {word[2:]: value for word, value in zip(words[::2], words[1::2], strict=False)}


def make_folds(data: Path, work: Path, count: int) -> list[Path]:
    """Folders holding a fold's manifests (its 100 target images as the validation split, every other image
    for training) and links to the staged images."""
    rows = [row for manifest in ("train.lst", "validation.lst") for row in read_manifest(data / manifest)]
    by_class = {label: sorted(path for row_label, path in rows if row_label == label) for label in (0, 1)}
    shuffle = random.Random(12345)
    for paths in by_class.values():
        shuffle.shuffle(paths)
    size = len(by_class[0]) // FOLDS
    folders = []
    for fold in range(count):
        held = {path for paths in by_class.values() for path in paths[fold * size : (fold + 1) * size]}
        folder = work / f"fold{fold}"
        folder.mkdir()
        for name in ("train", "dataset.json"):
            (folder / name).symlink_to(data / name)
        for manifest, held_out in (("train.lst", False), ("validation.lst", True)):
            kept = [(label, path) for label, path in rows if (path in held) == held_out]
            (folder / manifest).write_text(
                "".join(f"{index}\t{label}\t{path}\n" for index, (label, path) in enumerate(kept))
            )
        folders.append(folder)
    return folders


def fit_fold(folder: Path, out: Path, fold: int, seed: int, hyperparameters: dict) -> dict:
    fit_local(folder, out, architecture="resnet9", seed=seed, **hyperparameters)
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "fold": fold,
        "seed": seed,
        "precision": metrics["precision"],
        "accuracy": metrics["validation"]["accuracy"],
        "loss": metrics["history"][-1]["validation_loss"],
        "train_seconds": round(metrics["train_seconds"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "recipes", nargs="*", type=recipe, metavar="RECIPE", help="NAME=HYPERPARAMETERS (default: the README's four)"
    )
    parser.add_argument("--folds", type=int, choices=range(1, FOLDS + 1), default=6, help="folds fitted (default 6)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the first fold's fit; the others count on from it (default 0)",
    )
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=2, help="fits at once (default 2)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"default {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    recipes = args.recipes or [recipe(text) for text in DEFAULT_RECIPES]
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))  # read by each fit's train.py
    results = []
    with tempfile.TemporaryDirectory(prefix="scones-bench-recipes-") as work:
        data = Path(work) / "data"
        etl.stage(SHARED_ARCHIVE, data, etl.DEFAULT_CLASSES + EXTRA_CLASSES, progress=False)
        folders = make_folds(data, Path(work), args.folds)
        for name, hyperparameters in recipes:
            started = time.perf_counter()
            with ThreadPoolExecutor(args.jobs) as pool:
                folds = list(
                    pool.map(
                        lambda fold, name=name, hyperparameters=hyperparameters: fit_fold(
                            folders[fold], Path(work) / name / str(fold), fold, args.first_seed + fold, hyperparameters
                        ),
                        range(args.folds),
                    )
                )
            results.append(
                {
                    "recipe": name,
                    "hyperparameters": hyperparameters,
                    "folds": folds,
                    "accuracy_mean": statistics.mean(fold["accuracy"] for fold in folds),
                    "loss_mean": statistics.mean(fold["loss"] for fold in folds),
                    "train_seconds_median": statistics.median(fold["train_seconds"] for fold in folds),
                    "wall_seconds": round(time.perf_counter() - started, 1),
                }
            )
            print(json.dumps({key: value for key, value in results[-1].items() if key != "folds"}), file=sys.stderr)
    output = {
        "what": "validation accuracy and loss of training recipes, cross-validated on the bicycle and "
        f"motorcycle training images (folds of 100, {args.folds} of {FOLDS})",
        "command": shlex.join(["bench/recipes.py", *sys.argv[1:]]),
        "jobs": args.jobs,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipes": results,
    }
    etl.write_file(args.output, (json.dumps(output, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
