"""Probe an ensemble of the two photo-model recipes: `.venv/bin/python bench/ensemble_probe.py [--seeds 0,1,2]`.

Issue 23's untried idea, measured before anything is built: "neither" from the photo recipe (frozen
EfficientNet-Lite0 features at 128 px, linear head bicycle/motorcycle/neither; training/backbone.py) and
bicycle-against-motorcycle from both it and the 32-px network (`--architecture resnet9`, the default then), combined as

    p_bicycle, p_motorcycle = (1 - p_neither) * combine(backbone's conditional, network's conditional)

where a conditional is the pair p / (p_bicycle + p_motorcycle) each model serves, and `combine` is the
arithmetic mean (`mean`), the normalised geometric mean (`geometric`), or a logistic regression on the two
models' log-odds of bicycle (`stacked`), fitted on the calibration set's targets (below; its threshold from
5-fold out-of-fold stacked answers).

Per seed: the 32-px network is fitted by `training.fit.fit_local` on the vehicles archive (as `make run` staged it
until 2026-12-05); the photo
recipe's head by training.backbone's own functions (`chosen_rows`, `out_of_fold_logits`, `fit_head`) on the
shared subset archive (the ten vehicle classes, and 84 non-vehicle classes as neither), its temperature and
threshold by training.calibration from out-of-fold logits, as the recipe does. Both are served through their
own code/inference.py (`local.endpoint.load_inference_handler`), and each photo of real-photos-dev goes through
both. The ensemble's threshold (accepted answers right at least 99% of the time) is fitted on CIFAR answers
that neither model learnt: the network's 100 validation images of bicycle and motorcycle, and the backbone's
out-of-fold answers on a draw of its neither images at the same share (100 of its 1,000 targets), so that
neither counts as much as in the recipe's own calibration. Never on a photo. `backbone@calibration` is the
backbone alone on that same set: it separates the ensemble's effect from the change of calibration set.

Cached under /tmp/scones-ensemble-probe: the staged data, each seed's fitted network (reused when present;
`--refit` fits again) and the backbone features of CIFAR images (the per-image time is recorded with them).
Threads: `--threads` (default 1; the machine is shared), the fits included. Writes
bench/results/ensemble_probe.json. The photos only measure: nothing here trains or calibrates on them.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import realphotos  # noqa: E402
from bench.train import machine  # noqa: E402
from local.endpoint import load_inference_handler  # noqa: E402
from training import backbone, calibration, etl  # noqa: E402
from training.data import read_manifest  # noqa: E402
from training.fit import fit_local  # noqa: E402
from training.hyperparameters import parse_hyperparameters  # noqa: E402
from training.inference import to_inputs, to_pixels  # noqa: E402
from training.train import SERVING_CODE  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ensemble_probe.json"
CACHE = Path(tempfile.gettempdir()) / "scones-ensemble-probe"
SUBSET_ARCHIVE = etl.SHARED_ARCHIVE.parent / "cifar-100-python-subset.tar.gz"
VEHICLES = etl.DEFAULT_CLASSES + etl.VEHICLE_EXTRA_CLASSES
NEITHER = 2  # the backbone head's third output
COMBINATIONS = ("mean", "geometric", "stacked")
STACKER_FOLDS = 5


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rgb(split, row: int) -> Image.Image:
    return Image.fromarray(split.data[row].reshape(3, 32, 32).transpose(1, 2, 0))


def cached_features(model, name: str, split, rows: np.ndarray, hp) -> tuple[torch.Tensor, float]:
    """Backbone features of archive rows, computed once per row and kept in CACHE; and ms per image computed."""
    path = CACHE / f"features-{name}-{hp.image_size}-{hp.resize}.pt"
    store = torch.load(path) if path.is_file() else {"features": {}, "ms_per_image": None}
    missing = [row for row in dict.fromkeys(rows.tolist()) if row not in store["features"]]
    if missing:
        read = lambda row: to_pixels(rgb(split, row), hp.image_size, hp.resize)  # noqa: E731
        started = time.perf_counter()
        computed = backbone.features(model, missing, read, lambda text: log(f"{name} {text}"))
        store["ms_per_image"] = round(1000 * (time.perf_counter() - started) / len(missing), 2)
        store["features"].update(zip(missing, computed.clone(), strict=True))
        torch.save(store, path)
    return torch.stack([store["features"][row] for row in rows.tolist()]), store["ms_per_image"]


def network_answers(handler, model, split, rows: np.ndarray) -> torch.Tensor:
    """The 32-px network's served [p_bicycle, p_motorcycle] of archive rows, through its own predict_fn."""
    pixels = np.stack([to_pixels(rgb(split, row)) for row in rows.tolist()])
    return torch.cat([handler.predict_fn(to_inputs(chunk), model) for chunk in np.array_split(pixels, 10)])


def combine(photo: torch.Tensor, network: torch.Tensor, how: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The ensemble's [p_bicycle, p_motorcycle]: the backbone's share of the targets, split as `how` combines the
    two models' conditionals (the network's answer is already one: it sums to 1); "stacked" by `weights`."""
    targets = photo.sum(1, keepdim=True)
    conditional = photo / targets.clamp_min(1e-12)
    if how == "mean":
        joint = (conditional + network) / 2
    elif how == "geometric":
        joint = (conditional * network).sqrt()
        joint = joint / joint.sum(1, keepdim=True).clamp_min(1e-12)
    else:
        bicycle = torch.sigmoid(stacker_inputs(photo, network) @ weights)
        joint = torch.stack([bicycle, 1 - bicycle], 1)
    return targets * joint


def stacker_inputs(photo: torch.Tensor, network: torch.Tensor) -> torch.Tensor:
    """Each model's log-odds of bicycle against motorcycle, and a constant."""
    log_odds = lambda pair: pair[:, 0].clamp_min(1e-12).log() - pair[:, 1].clamp_min(1e-12).log()  # noqa: E731
    return torch.stack([log_odds(photo), log_odds(network), torch.ones(len(photo))], 1)


def fit_stacker(photo: torch.Tensor, network: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Logistic regression of bicycle (truth 0) against motorcycle on the two models' log-odds: (w_backbone,
    w_network, bias), a small L2 penalty on the two weights."""
    inputs, bicycle = stacker_inputs(photo, network), (truth == 0).float()
    weights = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.binary_cross_entropy_with_logits(inputs @ weights, bicycle) + 1e-3 * weights[:2].pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return weights.detach()


def stacked_calibration(photo, network, truth, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacker fitted on the calibration set's targets, and the set's stacked answers: each target's from a
    stacker fitted on the other folds, each neither image's from the whole one (which never saw it)."""
    targets = np.flatnonzero((truth < NEITHER).numpy())
    weights = fit_stacker(photo[targets], network[targets], truth[targets])
    answers = combine(photo, network, "stacked", weights)
    fold = np.random.default_rng(seed).integers(0, STACKER_FOLDS, len(targets))
    for k in range(STACKER_FOLDS):
        held, fitted = targets[fold == k], targets[fold != k]
        fold_weights = fit_stacker(photo[fitted], network[fitted], truth[fitted])
        answers[held] = combine(photo[held], network[held], "stacked", fold_weights)
    return weights, answers


def cifar_figures(served: torch.Tensor, truth: np.ndarray, threshold: float) -> dict:
    """On CIFAR test images (truth 0, 1 targets; 2 other vehicles; 3 non-vehicles)."""
    confidence, predicted = served.max(1)
    accepted, targets = (confidence >= threshold).numpy(), truth < 2
    right = predicted.numpy() == truth
    return {
        "test_accuracy": float(right[targets].mean()),
        "test_accepted": float(accepted[targets].mean()),
        "test_accepted_right": realphotos.share(int((right & accepted)[targets].sum()), int(accepted[targets].sum())),
        "other_vehicles_accepted": float(accepted[truth == 2].mean()),
        "non_vehicles_accepted": float(accepted[truth == 3].mean()),
    }


def photo_figures(answers: list[dict], threshold: float) -> dict:
    targets = [a for a in answers if a["class"] in realphotos.TARGETS]
    at = realphotos.at_threshold(answers, threshold)
    return {
        "right": realphotos.share(
            sum(a["p"] is not None and realphotos.three_way(a["p"]) == a["class"] for a in targets), len(targets)
        ),
        **realphotos.accepted_shares(at),
        "accepted_wrong_files": at["accepted_wrong_files"],
        "accepted_non_vehicle_files": at["accepted_non_vehicle_files"],
    }


def serve_photo_model(directory: Path, model, head, hp, temperature: float, threshold: float, name: str):
    """The photo recipe's model written as train.py writes it (model.ts, model.json, code/), loaded through its
    own inference.py."""
    (directory / "code").mkdir(parents=True)
    torch.jit.save(backbone.trace(backbone.PhotoClassifier(model, head), hp.image_size), directory / "model.ts")
    settings = {
        "classes": list(etl.DEFAULT_CLASSES),
        "architecture": {"name": hp.architecture, "num_outputs": NEITHER + 1},
        "flip_tta": False,
        "temperature": temperature,
        "threshold": threshold,
        "target_accuracy": hp.target_accuracy,
        "image_size": hp.image_size,
        "resize": hp.resize,
        "neither": True,
    }
    (directory / "model.json").write_text(json.dumps(settings))
    for file in SERVING_CODE:
        shutil.copyfile(ROOT / "training" / file, directory / "code" / file)
    handler = load_inference_handler(directory / "code", name)
    return handler, handler.model_fn(str(directory))


def fitted_network(data: Path, seed: int, refit: bool) -> tuple[Path, bool]:
    """The seed's model.tar.gz, and whether this run fitted it (else it is the cached one of an earlier run)."""
    out = CACHE / f"net-seed{seed}"
    fitting = refit or not (out / "model.tar.gz").is_file()
    if fitting:
        started = time.perf_counter()
        fit_local(data, out, architecture="resnet9", seed=seed)
        log(f"seed {seed}: network fitted in {time.perf_counter() - started:.0f}s")
    return out / "model.tar.gz", fitting


def run_seed(
    seed: int, cifar, network: tuple[Path, bool], model, photos: list, validation_names: set, work: Path
) -> dict:
    hp = parse_hyperparameters(["--architecture=efficientnet_lite0", f"--seed={seed}"])
    names = cifar.fine_label_names
    target_ids = [names.index(name) for name in etl.DEFAULT_CLASSES]
    others = sorted(set(np.unique(cifar.train.fine_labels).tolist()) - set(target_ids))
    label_of = {fine: label for label, fine in enumerate(target_ids + others)}
    labels = np.array([label_of[fine] for fine in cifar.train.fine_labels.tolist()])

    # The photo recipe: every target image, at most neither_per_class of each other class; out-of-fold calibration.
    kept = backbone.chosen_rows(labels, NEITHER, hp.neither_per_class, seed)
    inputs, ms_per_image = cached_features(model, "train", cifar.train, kept, hp)
    truth = torch.from_numpy(np.minimum(labels[kept], NEITHER))
    started = time.perf_counter()
    out_of_fold = backbone.out_of_fold_logits(inputs, truth, NEITHER + 1, hp, [])
    head = backbone.fit_head(inputs, truth, NEITHER + 1, hp)
    head_seconds = time.perf_counter() - started
    temperature = calibration.fit_temperature(out_of_fold, truth)
    photo_oof = torch.softmax(out_of_fold / temperature, 1)[:, :NEITHER]
    recipe_threshold = calibration.choose_threshold(photo_oof, truth, hp.target_accuracy)
    photo_handler, photo_model = serve_photo_model(
        work / f"photo{seed}", model, head, hp, temperature, recipe_threshold, f"scones_ensemble_photo{seed}"
    )

    with tarfile.open(network[0]) as tar:
        tar.extractall(work / f"net{seed}", filter="data")
    net_metrics = json.loads((work / f"net{seed}" / "metrics.json").read_text())
    net_handler = load_inference_handler(work / f"net{seed}" / "code", f"scones_ensemble_net{seed}")
    net_model = net_handler.model_fn(str(work / f"net{seed}"))

    # The calibration set: the network's validation images, and neither images at the targets' share.
    names_kept = [cifar.train.filenames[row] for row in kept.tolist()]
    validation = np.array([truth[i] < NEITHER and names_kept[i] in validation_names for i in range(len(kept))])
    if validation.sum() != len(validation_names):
        raise SystemExit(
            f"ensemble_probe: {SUBSET_ARCHIVE.name} lacks some of the network's validation images staged from "
            f"{etl.SHARED_ARCHIVE.name}: use the two archives of ../shared/data/README.md"
        )
    draw = np.random.default_rng(seed).random(len(kept)) < validation.sum() / (truth < NEITHER).sum().item()
    calibrating = validation | ((truth == NEITHER).numpy() & draw)
    cal_truth = truth[calibrating]
    cal_photo = photo_oof[calibrating]
    cal_network = network_answers(net_handler, net_model, cifar.train, kept[calibrating])

    # CIFAR test: targets (0, 1), other vehicles (2), non-vehicles (3).
    test_rows = np.arange(len(cifar.test.fine_labels))
    test_fine = cifar.test.fine_labels
    test_truth = np.select(
        [
            test_fine == target_ids[0],
            test_fine == target_ids[1],
            np.isin(test_fine, [names.index(v) for v in VEHICLES]),
        ],
        [0, 1, 2],
        3,
    )
    test_features, test_ms = cached_features(model, "test", cifar.test, test_rows, hp)
    with torch.no_grad():
        test_photo = torch.softmax(head(test_features) / temperature, 1)[:, :NEITHER]
    test_network = network_answers(net_handler, net_model, cifar.test, test_rows)
    # The served photo model must answer as the cached features and the head do.
    check = np.flatnonzero(test_truth < 2)
    served = torch.cat(
        [
            photo_handler.predict_fn(
                to_inputs(to_pixels(rgb(cifar.test, row), hp.image_size, hp.resize)[None]), photo_model
            )
            for row in check.tolist()
        ]
    )
    served_difference = (served - test_photo[check]).abs().max().item()

    # Photos, through both models' own code.
    photo_answers, net_photo_answers, photo_ms, net_ms = [], [], [], []
    for file, label, body, kind in photos:
        p, took, _ = realphotos.answer(photo_handler, photo_model, body, kind)
        q, net_took, _ = realphotos.answer(net_handler, net_model, body, kind)
        photo_answers.append({"file": file, "class": label, "p": p})
        net_photo_answers.append({"file": file, "class": label, "p": q})
        photo_ms.append(1000 * took)
        net_ms.append(1000 * net_took)

    variants = {
        "network": (test_network, net_photo_answers, net_metrics["threshold"], "its own (validation)"),
        "backbone": (test_photo, photo_answers, recipe_threshold, "the recipe's (out-of-fold, all images)"),
        "backbone@calibration": (
            test_photo,
            photo_answers,
            calibration.choose_threshold(cal_photo, cal_truth, hp.target_accuracy),
            "the ensemble's calibration set",
        ),
    }
    weights, stacked = stacked_calibration(cal_photo, cal_network, cal_truth, seed)
    for how in COMBINATIONS:
        calibrating_answers = stacked if how == "stacked" else combine(cal_photo, cal_network, how)
        ensemble_photos = [
            {
                **a,
                "p": None
                if a["p"] is None or b["p"] is None
                else combine(torch.tensor([a["p"]]), torch.tensor([b["p"]]), how, weights)[0].tolist(),
            }
            for a, b in zip(photo_answers, net_photo_answers, strict=True)
        ]
        threshold = calibration.choose_threshold(calibrating_answers, cal_truth, hp.target_accuracy)
        variants[how] = (
            combine(test_photo, test_network, how, weights),
            ensemble_photos,
            threshold,
            "the ensemble's calibration set",
        )
    run = {
        "seed": seed,
        "photo_head": {
            "training_images": len(kept),
            "temperature": round(temperature, 4),
            "feature_ms_per_image": ms_per_image,
            "head_seconds": round(head_seconds, 1),
            "train_seconds_estimated": round(ms_per_image * len(kept) / 1000 + head_seconds, 1),
            "served_minus_cached_max_difference": served_difference,
        },
        "network": {
            "temperature": net_metrics["temperature"],
            "train_seconds": round(net_metrics["train_seconds"], 1),
            "precision": net_metrics["precision"],
            "fitted_by_this_run": network[1],
        },
        "stacker_weights": dict(
            zip(("backbone", "network", "bias"), [round(w, 3) for w in weights.tolist()], strict=True)
        ),
        "calibration_set": {"targets": int(validation.sum()), "neither": int(calibrating.sum() - validation.sum())},
        "latency_ms_p50": {
            "photo_model": round(statistics.median(photo_ms), 2),
            "network": round(statistics.median(net_ms), 2),
            "both": round(statistics.median(np.add(photo_ms, net_ms).tolist()), 2),
        },
        "variants": {},
    }
    # max(p) <= p_bicycle + p_motorcycle = the backbone's 1 - p_neither, whatever the conditional: the photos whose
    # backbone share of the targets reaches a threshold are the most that any combination can accept at it.
    target_shares = [sum(a["p"] or [0.0]) for a in photo_answers if a["class"] in realphotos.TARGETS]
    for name, (test, answers, threshold, fitted_on) in variants.items():
        run["variants"][name] = {
            "threshold": round(threshold, 4),
            "threshold_from": fitted_on,
            "photos": photo_figures(answers, threshold),
            "cifar": cifar_figures(test, test_truth, threshold),
        }
        figures = run["variants"][name]
        if name != "network":
            figures["photos"]["accepted_at_most"] = realphotos.share(
                sum(value >= threshold for value in target_shares), len(target_shares)
            )
        log(
            f"seed {seed} {name:>20}: threshold {threshold:.3f}; photos right {figures['photos']['right']:.3f}, "
            f"accepted {figures['photos']['accepted']:.0%} (right {figures['photos']['accepted_right'] or 0:.1%}), "
            f"cars {figures['photos']['car_accepted']:.0%}, others {figures['photos']['other_accepted']:.0%}; "
            f"CIFAR test {figures['cifar']['test_accuracy']:.2f}, non-vehicles accepted "
            f"{figures['cifar']['non_vehicles_accepted']:.1%}"
        )
    return run


def headline(variant: dict) -> dict:
    return {
        **{key: value for key, value in variant["photos"].items() if not key.endswith("_files")},
        "threshold": variant["threshold"],
        "cifar_test_accuracy": variant["cifar"]["test_accuracy"],
        "cifar_non_vehicles_accepted": variant["cifar"]["non_vehicles_accepted"],
    }


def summary(runs: list[dict]) -> dict:
    """Per variant: each figure's per-seed values, mean and median, and issue 23's goals met by every seed."""
    out = {}
    for name in runs[0]["variants"]:
        rows = [headline(run["variants"][name]) for run in runs]
        figures = {
            key: {
                "per_seed": [row[key] for row in rows],
                "mean": round(statistics.mean(row[key] or 0 for row in rows), 4),
                "median": round(statistics.median(row[key] or 0 for row in rows), 4),
            }
            for key in rows[0]
        }
        goals = {
            key: all(
                row[key] is not None and (row[key] >= bound if sense == ">=" else row[key] <= bound) for row in rows
            )
            for key, (sense, bound) in realphotos.GOALS.items()
        }
        out[name] = {"figures": figures, "goals_met_by_every_seed": goals}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seeds", type=realphotos.seeds, default=[0, 1, 2], help="seeds of both models (default 0,1,2)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the fits' too (default 1)")
    parser.add_argument("--refit", action="store_true", help=f"fit the networks again, not reusing {CACHE}")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    if not all((realphotos.PHOTOS / label).is_dir() for label in realphotos.FOLDERS) or not SUBSET_ARCHIVE.is_file():
        log(f"ensemble_probe: needs {realphotos.PHOTOS} and {SUBSET_ARCHIVE} (see ../shared/data/README.md)")
        return 1
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by each fit's train.py
    CACHE.mkdir(exist_ok=True)
    load_before = os.getloadavg()[0]

    data = CACHE / "data-vehicles"  # as `make run` stages it (bench/realphotos.py does the same)
    etl.stage(etl.SHARED_ARCHIVE, data, extra_classes=etl.VEHICLE_EXTRA_CLASSES, progress=False)
    networks = {seed: fitted_network(data, seed, args.refit) for seed in args.seeds}
    validation_names = {
        relative.split("/")[-1] for label, relative in read_manifest(data / "validation.lst") if label < 2
    }
    cifar = etl.read_archive(SUBSET_ARCHIVE, encoding="latin1")
    photos = realphotos.read_photos(realphotos.PHOTOS)
    model = backbone.load_backbone(parse_hyperparameters(["--architecture=efficientnet_lite0"]).image_size)
    with tempfile.TemporaryDirectory(prefix="scones-ensemble-probe-") as work:
        runs = [
            run_seed(seed, cifar, networks[seed], model, photos, validation_names, Path(work)) for seed in args.seeds
        ]
    results = {
        "benchmark": "ensemble: neither from the photo recipe, bicycle or motorcycle from it and the 32-px network",
        "command": f".venv/bin/python bench/ensemble_probe.py --seeds {','.join(map(str, args.seeds))}"
        + (f" --threads {args.threads}" if args.threads != 1 else ""),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "photos": {label: sum(p[1] == label for p in photos) for label in realphotos.FOLDERS},
        "archives": {"network": etl.SHARED_ARCHIVE.name, "photo_head": SUBSET_ARCHIVE.name},
        "threads": args.threads,
        "summary": summary(runs),
        "runs": runs,
        "machine": machine(),
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    etl.write_file(args.out, (json.dumps(results, indent=2) + "\n").encode())
    for name, variant in results["summary"].items():
        log(f"{name}: " + json.dumps({key: value["mean"] for key, value in variant["figures"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
