"""Train the bicycle/motorcycle classifier, and serve the model it writes.

One self-contained file (torch, numpy, Pillow and the standard library) in SageMaker's script-mode
conventions, so that the same file trains on this machine's CPU and in SageMaker's PyTorch container:

- run as a script it trains: hyperparameters as `--name value` arguments, images and `.lst` manifests
  from the `SM_CHANNEL_*` directories, the model to `SM_MODEL_DIR`, metrics and plots to
  `SM_OUTPUT_DATA_DIR`;
- it copies itself into the model as `code/inference.py`, where its `model_fn`, `input_fn`,
  `predict_fn` and `output_fn` are the handler of SageMaker's PyTorch inference container.

The model answers the probabilities of the target classes, labels 0..target_classes-1, in label order,
e.g. `[p_bicycle, p_motorcycle]`, with a temperature fitted on their validation images. Images of further
labels in the manifests (other classes staged after the targets, e.g. `python -m training.etl --classes
bicycle,motorcycle,bus,...`) are learnt alongside as more outputs of the same network, their loss
weighted below the targets' (`--target_weight`) and a share of them drawn afresh for each epoch
(`--extra_fraction`): they sharpen its features, and their validation images join the training set, as only
the target classes are validated.
"""

import argparse
import copy
import io
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

IMAGE_SIZE = 32
IMAGE_CONTENT_TYPES = ("image/png", "image/jpeg", "application/x-image")
CLASSIC_THRESHOLDS = (0.80, 0.93)
CALIBRATION_BINS = 10
# As in Page's ResNet-9: max-pooled features are large, and unscaled logits make the first epochs unstable.
LOGIT_SCALE = 0.125
# The hyperparameters whose default is "auto", by the precision training runs in: bfloat16 on a CPU with
# AVX512-BF16 computes this model about 3 times faster than float32 on AVX2, and the recipe uses that time
# (measured on 2 cores: 168 s in float32 on AVX2, 149 s in bfloat16 on AVX512-BF16; the goal is 3 minutes).
AUTO = {"float32": {"epochs": 42, "extra_fraction": 0.25}, "bfloat16": {"epochs": 85, "extra_fraction": 0.5}}


# ---------------------------------------------------------------------------------------------- model

def conv_bn(channels_in: int, channels_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class Classifier(nn.Module):
    """A ResNet-9-style convnet taking RGB images scaled to 0..1; it normalises them itself."""

    def __init__(self, num_outputs: int, width: int, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.features = nn.Sequential(
            conv_bn(3, width),
            conv_bn(width, 2 * width, pool=True), Residual(2 * width),
            conv_bn(2 * width, 4 * width, pool=True),
            conv_bn(4 * width, 8 * width, pool=True), Residual(8 * width),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(8 * width, num_outputs)

    def forward(self, images):
        return self.head(self.features((images - self.mean) / self.std)) * LOGIT_SCALE


class MirrorAveraged(nn.Module):
    """The model's logits averaged with those of the mirror images, the two passes run in parallel once traced
    (torch.jit.fork runs the second on one of PyTorch's inter-op threads)."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, images):
        mirrored = torch.jit.fork(self.model, images.flip(3).contiguous(memory_format=torch.channels_last))
        return (self.model(images) + torch.jit.wait(mirrored)) / 2


def target_logits(model: Classifier, images: torch.Tensor, num_classes: int, flip_tta: bool) -> torch.Tensor:
    """Logits of the target classes in float32, averaged with the mirrored image's when `flip_tta`, as served."""
    served = MirrorAveraged(model) if flip_tta else model
    return served(images.contiguous(memory_format=torch.channels_last))[:, :num_classes].float()


# ------------------------------------------------------------------------------------------- serving

def to_pixels(image: Image.Image) -> np.ndarray:
    """The 3x32x32 uint8 array the model sees: RGB, resized to 32x32 when the size differs."""
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.array(image, dtype=np.uint8).transpose(2, 0, 1)


def to_inputs(pixels) -> torch.Tensor:
    """uint8 pixels (N, 3, 32, 32) to the float 0..1 tensor the model takes."""
    return torch.as_tensor(pixels).float().div(255)


def model_fn(model_dir):
    model_dir = Path(model_dir)
    settings = json.loads((model_dir / "model.json").read_text())
    architecture = settings["architecture"]
    model = Classifier(architecture["num_outputs"], architecture["width"], settings["mean"], settings["std"])
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
    model = model.to(memory_format=torch.channels_last).eval()
    return {"model": frozen(MirrorAveraged(model) if settings["flip_tta"] else model), "settings": settings}


def frozen(model: nn.Module) -> torch.jit.ScriptModule:
    """The model as a frozen TorchScript graph, batch norm folded into the convolutions. Besides being faster, a
    prediction is one call into C++ that lets go of the GIL once, where the eager model takes it back after each
    of its ~40 operations and waits each time for the server's other busy threads."""
    example = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous(memory_format=torch.channels_last)
    # TorchScript is deprecated for torch.compile, which needs a C++ compiler where the model is served and
    # compiles for seconds; TorchScript runs in every PyTorch container SageMaker has.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.freeze(torch.jit.trace(model.eval(), example))


def input_fn(request_body, content_type):
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in IMAGE_CONTENT_TYPES:
        raise ValueError(f"unsupported content type {content_type!r}: send one of {', '.join(IMAGE_CONTENT_TYPES)}")
    try:
        with Image.open(io.BytesIO(request_body)) as image:
            pixels = to_pixels(image)
    except (OSError, SyntaxError, ValueError, TypeError) as error:
        raise ValueError(f"the request body is not a decodable image ({content_type}): {error}") from None
    return to_inputs(pixels[None])


def predict_fn(data, model):
    settings = model["settings"]
    with torch.no_grad():
        logits = model["model"](data.contiguous(memory_format=torch.channels_last))[:, :len(settings["classes"])]
    return torch.softmax(logits / settings["temperature"], dim=1)


def output_fn(prediction, accept):
    return json.dumps(prediction[0].tolist()), "application/json"


# ----------------------------------------------------------------------------------- hyperparameters

class HyperparameterError(ValueError):
    """A hyperparameter is unknown or out of range; the message names it."""


class HyperparameterParser(argparse.ArgumentParser):
    """An argument parser that raises HyperparameterError instead of printing usage and exiting."""

    def error(self, message):
        raise HyperparameterError(message)


def _bounded(kind, low, high, auto: bool = False):
    def parse(text):
        if auto and text == "auto":
            return text
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' if kind is int else ''} {kind.__name__}"
                                             f"{' or auto' if auto else ''}; valid range [{low}, {high}]") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside the valid range [{low}, {high}]")
        return value
    return parse


def _one_of(choices):
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return parse


# name: (type, default, low, high, help), or for a choice (str, default, choices, None, help); SageMaker passes each as `--name value`.
HYPERPARAMETERS = {
    "epochs": (int, "auto", 1, 1000, "passes over the target classes' training images"),
    "batch_size": (int, 128, 1, 4096, "images per step"),
    "learning_rate": (float, 0.2, 1e-6, 10.0, "peak of the one-cycle learning rate (SGD, Nesterov momentum)"),
    "weight_decay": (float, 5e-4, 0.0, 1.0, "L2 penalty on convolution and linear weights"),
    "label_smoothing": (float, 0.0, 0.0, 0.5, "label smoothing of the cross-entropy loss"),
    "width": (int, 16, 4, 256, "channels of the first layer; deeper layers have 2x, 4x, 8x"),
    "cutout": (int, 8, 0, IMAGE_SIZE, "side of the square erased from each training image (0: none)"),
    "flip_tta": (int, 1, 0, 1, "1: average the predictions of each image and its mirror image"),
    "bfloat16": (str, "auto", ("auto", "1", "0"), None,
                 "1: train in bfloat16 autocast; auto: where the GPU or CPU computes bfloat16 natively "
                 "(a CPU without AVX512-BF16 or AMX emulates it, over 10x slower than float32)"),
    "weight_average": (float, 0.99, 0.0, 0.9999,
                       "decay of the moving average of the weights kept as the model, updated each step (0: the last weights)"),
    "target_weight": (float, 3.0, 0.1, 100.0, "loss weight of the target classes relative to the others learnt alongside"),
    "extra_fraction": (float, "auto", 0.0, 1.0,
                       "share of the other classes' training images drawn afresh for each epoch"),
    "target_classes": (int, 2, 2, 100, "labels 0..N-1 are the classes served; further labels are learnt alongside"),
    "target_accuracy": (float, 0.99, 0.5, 1.0, "accuracy wanted on accepted answers; sets the threshold"),
    "seed": (int, 0, 0, 2**31 - 1, "seed of initialisation, shuffling and augmentation"),
}


def add_hyperparameters(parser) -> None:
    for name, (kind, default, low, high, help_text) in HYPERPARAMETERS.items():
        if kind is str:
            parser.add_argument(f"--{name}", type=_one_of(low), default=default, metavar="|".join(low),
                                help=f"{help_text} (default {default})")
        else:
            auto = default == "auto"
            if auto:
                help_text += (f"; auto: {AUTO['bfloat16'][name]} where training runs in bfloat16, "
                              f"{AUTO['float32'][name]} in float32")
            parser.add_argument(f"--{name}", type=_bounded(kind, low, high, auto), default=default,
                                metavar=kind.__name__.upper(),
                                help=f"{help_text} (default {default}, range [{low}, {high}])")


def parse_hyperparameters(argv) -> argparse.Namespace:
    parser = HyperparameterParser(prog="train.py")
    add_hyperparameters(parser)
    return parser.parse_args(argv)


# -------------------------------------------------------------------------------------------- data

def channel(name: str, required: bool = True) -> Path | None:
    variable = f"SM_CHANNEL_{name.upper()}"
    directory = Path(os.environ.get(variable, f"/opt/ml/input/data/{name}"))
    if directory.is_dir():
        return directory
    if required:
        raise SystemExit(f"train.py: error: channel {name!r} not found at {directory} (set {variable})")
    return None


def read_manifest(path: Path) -> list[tuple[int, str]]:
    """(label, relative image path) rows of a SageMaker `.lst` manifest: `index<TAB>label<TAB>path`."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            fields = line.split("\t")
            if len(fields) < 3:
                raise SystemExit(f"train.py: error: {path}:{number}: not `index<TAB>label<TAB>path`")
            rows.append((int(float(fields[1])), fields[-1]))
    return rows


def load_split(image_dir: Path, manifest: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decoded uint8 images (N, 3, 32, 32), their labels and manifest paths."""
    rows = read_manifest(manifest)
    images = np.empty((len(rows), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for index, (_, relative) in enumerate(rows):
        path = image_dir / relative
        if not path.is_file():  # SageMaker may drop the `train/` of `train/x.png` when it downloads a channel
            path = image_dir / Path(relative).name
        if not path.is_file():
            raise SystemExit(f"train.py: error: {relative} (listed in {manifest}) is not in {image_dir}")
        with Image.open(path) as image:
            images[index] = to_pixels(image)
    return images, np.array([label for label, _ in rows], dtype=np.int64), [relative for _, relative in rows]


def subset(split, num_classes: int, targets: bool = True):
    """The rows of a split whose labels are (or, with `targets=False`, are not) below `num_classes`."""
    keep = (split[1] < num_classes) == targets
    return split[0][keep], split[1][keep], [path for path, kept in zip(split[2], keep) if kept]


def concatenate(split, other):
    return np.concatenate([split[0], other[0]]), np.concatenate([split[1], other[1]]), split[2] + other[2]


def class_names(num_classes: int, search_dirs) -> list[str]:
    """Target class names in label order, from a dataset.json beside the data if there is one."""
    for directory in search_dirs:
        path = directory / "dataset.json"
        if path.is_file():
            classes = json.loads(path.read_text()).get("classes")
            if classes:
                named = [(entry["label"], entry["name"]) if isinstance(entry, dict) else (index, entry)
                         for index, entry in enumerate(classes)]
                return [name for _, name in sorted(named)][:num_classes]
    return [str(label) for label in range(num_classes)]


# -------------------------------------------------------------------------------------------- training

def augment(images: torch.Tensor, generator: torch.Generator, cutout: int) -> torch.Tensor:
    """Random 4-pixel-padded crops, horizontal flips and cutout of a uint8 batch, as floats 0..1."""
    count = images.shape[0]
    padded = F.pad(to_inputs(images), (4, 4, 4, 4), mode="reflect")
    offsets = torch.randint(0, 9, (2, count, 1), generator=generator)
    steps = torch.arange(IMAGE_SIZE)
    rows, columns = (offsets[0] + steps)[:, :, None], (offsets[1] + steps)[:, None, :]
    crops = padded.permute(0, 2, 3, 1)[torch.arange(count)[:, None, None], rows, columns].permute(0, 3, 1, 2)
    flip = torch.rand(count, generator=generator) < 0.5
    crops = torch.where(flip[:, None, None, None], crops.flip(3), crops)
    if cutout:
        centres = torch.randint(0, IMAGE_SIZE, (2, count, 1), generator=generator)
        inside_rows = ((steps - centres[0]).abs() <= cutout // 2)[:, :, None]
        inside_columns = ((steps - centres[1]).abs() <= cutout // 2)[:, None, :]
        crops = crops * ~(inside_rows & inside_columns)[:, None]
    return crops.contiguous(memory_format=torch.channels_last)


def evaluate(model, images: np.ndarray, num_classes: int, flip_tta: bool, device) -> torch.Tensor:
    """Target logits of uint8 images, in float32 on the CPU."""
    model.eval()
    with torch.no_grad():
        return torch.cat([target_logits(model, to_inputs(batch).to(device), num_classes, flip_tta).cpu()
                          for batch in np.array_split(images, max(1, math.ceil(len(images) / 500)))])


def use_bfloat16(setting: str, device) -> bool:
    if setting != "auto":
        return setting == "1"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def train(args, data, num_classes: int, device, bfloat16: bool) -> tuple[Classifier, list[dict]]:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_images, train_labels = torch.as_tensor(data["train"][0]), torch.as_tensor(data["train"][1])
    mean = (train_images.float() / 255).mean((0, 2, 3)).tolist()
    std = (train_images.float() / 255).std((0, 2, 3)).tolist()
    num_outputs = max(num_classes, int(train_labels.max()) + 1)
    model = Classifier(num_outputs, args.width, mean, std).to(device, memory_format=torch.channels_last)
    class_weights = torch.ones(num_outputs, device=device)
    class_weights[:num_classes] = args.target_weight

    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=args.learning_rate, momentum=0.9, nesterov=True)
    target_rows = torch.nonzero(train_labels < num_classes).flatten()
    extra_rows = torch.nonzero(train_labels >= num_classes).flatten()
    extras_per_epoch = round(args.extra_fraction * len(extra_rows))
    epoch_size = len(target_rows) + extras_per_epoch
    batch_size = min(args.batch_size, epoch_size)
    steps_per_epoch = epoch_size // batch_size
    averaged = copy.deepcopy(model)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.learning_rate, epochs=args.epochs,
                                                   steps_per_epoch=steps_per_epoch, pct_start=0.25)
    validation_images, validation_labels = data["validation"][0], torch.as_tensor(data["validation"][1])

    history = []
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        rows = torch.cat([target_rows, extra_rows[torch.randperm(len(extra_rows), generator=generator)[:extras_per_epoch]]])
        order = rows[torch.randperm(len(rows), generator=generator)]
        loss_sum = correct = seen = 0
        lr = schedule.get_last_lr()[0]
        for step in range(steps_per_epoch):
            batch = order[step * batch_size:(step + 1) * batch_size]
            inputs = augment(train_images[batch], generator, args.cutout).to(device)
            labels = train_labels[batch].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16):
                logits = model(inputs)
            loss = F.cross_entropy(logits.float(), labels, weight=class_weights, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            update_average(averaged, model, args.weight_average, len(history) * steps_per_epoch + step)
            loss_sum += loss.item() * len(batch)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(batch)
        logits = evaluate(averaged, validation_images, num_classes, bool(args.flip_tta), device)
        record = {"epoch": epoch, "lr": lr, "images": seen, "train_loss": loss_sum / seen,
                  "train_accuracy": correct / seen,
                  "validation_loss": F.cross_entropy(logits, validation_labels).item(),
                  "validation_accuracy": (logits.argmax(1) == validation_labels).float().mean().item(),
                  "seconds": time.perf_counter() - started}
        history.append(record)
        log(f"epoch {epoch:3d}/{args.epochs}  lr {lr:.4f}  train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.3f}  validation loss {record['validation_loss']:.4f} "
            f"acc {record['validation_accuracy']:.3f}  {record['seconds']:.0f}s")
    return averaged, history


def update_average(averaged: Classifier, model: Classifier, decay: float, step: int) -> None:
    """One step of the exponential moving average of the weights and batch-norm statistics. The decay is lower
    for the first steps, so that the initial weights do not linger in the average of a short run."""
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for kept, current in zip(averaged.state_dict().values(), model.state_dict().values()):
            if kept.dtype.is_floating_point:
                kept.lerp_(current, 1 - decay)
            else:
                kept.copy_(current)


# ------------------------------------------------------------------------------------------ calibration

def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the negative log-likelihood, searched on a log grid (deterministic). When every
    answer is right the likelihood only grows as the temperature falls, and the search would end at the grid's
    floor with every probability near 1: the logits are then left as they are (temperature 1)."""
    if bool((logits.argmax(1) == labels).all()):
        return 1.0
    candidates = torch.logspace(-2, 2, 801)
    losses = torch.stack([F.cross_entropy(logits / t, labels) for t in candidates])
    return float(candidates[losses.argmin()])


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).float()
    bins = torch.clamp((confidence * CALIBRATION_BINS).long(), max=CALIBRATION_BINS - 1)
    error = 0.0
    for b in range(CALIBRATION_BINS):
        inside = bins == b
        if inside.any():
            error += inside.float().mean().item() * abs(correct[inside].mean().item() - confidence[inside].mean().item())
    return error


def choose_threshold(probabilities: torch.Tensor, labels: torch.Tensor, target_accuracy: float) -> float:
    """The lowest confidence threshold at which answers at or above it are right often enough (1.0 if none)."""
    confidence, predicted = probabilities.max(1)
    for threshold in sorted(set(confidence.tolist())):
        accepted = confidence >= threshold
        if (predicted[accepted] == labels[accepted]).float().mean().item() >= target_accuracy:
            return threshold
    return 1.0


def selective(probabilities: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    """Share of answers at or above `threshold` (coverage) and their accuracy."""
    confidence, predicted = probabilities.max(1)
    accepted = confidence >= threshold
    return {"threshold": threshold, "coverage": accepted.float().mean().item(),
            "accuracy": (predicted[accepted] == labels[accepted]).float().mean().item() if accepted.any() else None}


def class_report(predicted: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    report = {}
    for label, name in enumerate(classes):
        true_positives = ((predicted == label) & (labels == label)).sum().item()
        report[name] = {"precision": true_positives / max(1, (predicted == label).sum().item()),
                        "recall": true_positives / max(1, (labels == label).sum().item())}
    return report


def test_report(model, split, classes, temperature: float, threshold: float, flip_tta: bool, device):
    """Test metrics (with every image's probabilities, as served), and what the plots need."""
    images, labels, paths = split
    logits = evaluate(model, images, len(classes), flip_tta, device)
    label_tensor = torch.as_tensor(labels)
    probabilities = torch.softmax(logits / temperature, dim=1)
    predicted = probabilities.argmax(1)
    report = {
        "accuracy": (predicted == label_tensor).float().mean().item(),
        "images": len(labels),
        "per_class": class_report(predicted, label_tensor, classes),
        "ece_before_temperature": expected_calibration_error(torch.softmax(logits, 1), label_tensor),
        "ece_after_temperature": expected_calibration_error(probabilities, label_tensor),
        "at_threshold": selective(probabilities, label_tensor, threshold),
        "at_classic_thresholds": [selective(probabilities, label_tensor, t) for t in CLASSIC_THRESHOLDS],
        "predictions": [{"image": path, "label": int(label), "probabilities": row}
                        for path, label, row in zip(paths, labels, probabilities.tolist())],
    }
    for_plots = {"images": images, "labels": labels.tolist(), "predicted": predicted.tolist(),
                 "probabilities": probabilities, "raw_probabilities": torch.softmax(logits, 1)}
    return report, for_plots


# ---------------------------------------------------------------------------------------------- plots

def plot(output_dir: Path, metrics: dict, test: dict | None) -> None:
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed: no plots")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history, classes = metrics["history"], metrics["classes"]
    epochs = [record["epoch"] for record in history]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for split, label in (("train", "train (augmented, all classes learnt)"), ("validation", "validation (targets)")):
        axes[0].plot(epochs, [record[f"{split}_loss"] for record in history], label=label)
        axes[1].plot(epochs, [record[f"{split}_accuracy"] for record in history], label=label)
    axes[2].plot(epochs, [record["lr"] for record in history])
    for axis, title in zip(axes, ("loss", "accuracy", "learning rate (epoch start)")):
        axis.set(title=title, xlabel="epoch")
    axes[0].legend()
    axes[1].legend()
    save(figure, output_dir / "training_curves.png")
    if test is None:
        return

    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for label, predicted in zip(test["labels"], test["predicted"]):
        confusion[label, predicted] += 1
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.imshow(confusion, cmap="Blues")
    for (row, column), count in np.ndenumerate(confusion):
        axis.text(column, row, str(count), ha="center", va="center",
                  color="white" if count > confusion.max() / 2 else "black")
    axis.set(xticks=range(len(classes)), xticklabels=classes, yticks=range(len(classes)), yticklabels=classes,
             xlabel="predicted", ylabel="true", title=f"test accuracy {metrics['test']['accuracy']:.3f}")
    save(figure, output_dir / "confusion_matrix.png")

    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], "k:", label="perfect calibration")
    for name, probabilities in (("before temperature", test["raw_probabilities"]),
                                ("after temperature", test["probabilities"])):
        confidence, predicted = probabilities.max(1)
        correct = (predicted == torch.as_tensor(test["labels"])).float()
        bins = torch.clamp((confidence * CALIBRATION_BINS).long(), max=CALIBRATION_BINS - 1)
        used = [b for b in range(CALIBRATION_BINS) if (bins == b).any()]
        axis.plot([confidence[bins == b].mean().item() for b in used],
                  [correct[bins == b].mean().item() for b in used], "o-", label=name)
    axis.set(xlabel="confidence", ylabel="accuracy", title="reliability on the test split", xlim=(0, 1), ylim=(0, 1))
    axis.legend()
    save(figure, output_dir / "reliability_diagram.png")

    count = len(test["labels"])
    columns = min(10, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.5 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < count:
            label, predicted = test["labels"][index], test["predicted"][index]
            axis.imshow(test["images"][index].transpose(1, 2, 0))
            confidence = test["probabilities"][index].max().item()
            wrong = predicted != label
            axis.set_title(f"{'✗ ' if wrong else ''}{classes[predicted]} {confidence:.2f}", fontsize=7,
                           color="red" if wrong else "black")
    figure.suptitle("test images: prediction and confidence (wrong ones in red with ✗)")
    save(figure, output_dir / "test_predictions.png")


PICTURES = {"training_curves": "Training curves", "confusion_matrix": "Confusion matrix (test split)",
            "reliability_diagram": "Reliability diagram (test split)",
            "test_predictions": "Test images with predictions (wrong ones in red)"}


def write_report(output_dir: Path, metrics: dict) -> None:
    """report.html beside the plots: the figures that matter, then every plot, embedded so it opens from disk."""
    import base64
    import html

    def percent(value):
        return "n/a" if value is None else f"{value:.1%}"

    rows = [("classes", ", ".join(metrics["classes"])), ("recipe", metrics["recipe"]),
            ("training", f"{metrics['train_seconds']:.0f} s on {metrics['device']} ({metrics['precision']}), "
                         f"{metrics['train_images']} images, seed {metrics['seed']}"),
            ("validation accuracy", percent(metrics["validation"]["accuracy"])),
            ("threshold", f"{metrics['threshold']:.4f} (accepted validation answers right at least "
                          f"{metrics['hyperparameters']['target_accuracy']:.0%} of the time)")]
    test = metrics.get("test")
    if test:
        rows += [("test accuracy", f"{percent(test['accuracy'])} of {test['images']} images"),
                 *((f"{name}: precision, recall", f"{percent(score['precision'])}, {percent(score['recall'])}")
                   for name, score in test["per_class"].items()),
                 *((f"at threshold {entry['threshold']:.4g}",
                    f"answers {percent(entry['coverage'])} of test images, {percent(entry['accuracy'])} of them right")
                   for entry in (test["at_threshold"], *test["at_classic_thresholds"])),
                 ("calibration error (test)", f"{test['ece_before_temperature']:.3f} before the temperature, "
                                              f"{test['ece_after_temperature']:.3f} after")]
    table = "".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>" for name, value in rows)
    figures = "".join(
        f"<h2>{title}</h2><img alt=\"{title}\" src=\"data:image/png;base64,"
        f"{base64.b64encode((output_dir / f'{name}.png').read_bytes()).decode()}\">"
        for name, title in PICTURES.items() if (output_dir / f"{name}.png").is_file())
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Model report</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:80em}th{text-align:left;padding-right:2em}"
            "img{max-width:100%}</style></head><body><h1>Model report</h1>"
            f"<table>{table}</table>{figures}</body></html>\n")
    partial = output_dir / ".report.html.partial"
    partial.write_text(page)
    os.replace(partial, output_dir / "report.html")


def save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    import matplotlib.pyplot as plt
    plt.close(figure)


# ----------------------------------------------------------------------------------------------- main

def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_data(num_classes: int) -> tuple[dict, list[str]]:
    """The train, validation and (if its channels are there) test splits, and the target class names.

    Only target labels are validated and tested; the validation images of other labels join the training set.
    """
    image_dir, train_lst = channel("train"), channel("train_lst")
    validation_dir, validation_lst = channel("validation"), channel("validation_lst")
    test_dir, test_lst = channel("test", required=False), channel("test_lst", required=False)
    validation = load_split(validation_dir, validation_lst / "validation.lst")
    data = {"train": concatenate(load_split(image_dir, train_lst / "train.lst"), subset(validation, num_classes, False)),
            "validation": subset(validation, num_classes)}
    if test_dir and test_lst and (test_lst / "test.lst").is_file():
        data["test"] = subset(load_split(test_dir, test_lst / "test.lst"), num_classes)
    missing = sorted(set(range(num_classes)) - set(data["train"][1].tolist()) - set(data["validation"][1].tolist()))
    if missing:
        raise SystemExit(f"train.py: error: no training or validation images of target labels {missing}")
    return data, class_names(num_classes, [train_lst, image_dir, validation_lst])


def main(argv=None) -> None:
    try:
        args = parse_hyperparameters(sys.argv[1:] if argv is None else argv)
    except HyperparameterError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        raise SystemExit(2)
    model_dir = Path(os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    output_dir = Path(os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, on a GPU
    torch.use_deterministic_algorithms(True, warn_only=True)  # a few CUDA kernels have no deterministic variant
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bfloat16 = use_bfloat16(args.bfloat16, device)
    for name, value in AUTO["bfloat16" if bfloat16 else "float32"].items():
        if getattr(args, name) == "auto":
            setattr(args, name, value)

    loading = time.perf_counter()
    num_classes = args.target_classes
    data, classes = load_data(num_classes)
    log(f"{len(data['train'][0])} training, {len(data['validation'][0])} validation, "
        f"{len(data['test'][0]) if 'test' in data else 0} test images loaded in "
        f"{time.perf_counter() - loading:.1f}s; classes {classes}; device {device}, "
        f"{'bfloat16' if bfloat16 else 'float32'}")

    started, cpu_started = time.perf_counter(), time.process_time()
    model, history = train(args, data, num_classes, device, bfloat16)
    train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    model.eval()
    flip_tta = bool(args.flip_tta)

    validation_logits = evaluate(model, data["validation"][0], num_classes, flip_tta, device)
    validation_labels = torch.as_tensor(data["validation"][1])
    temperature = fit_temperature(validation_logits, validation_labels)
    validation_probabilities = torch.softmax(validation_logits / temperature, dim=1)
    threshold = choose_threshold(validation_probabilities, validation_labels, args.target_accuracy)

    metrics = {
        "classes": classes,
        "seed": args.seed,
        "hyperparameters": vars(args),
        "recipe": f"ResNet-9-style convnet (width {args.width}), SGD Nesterov, one-cycle LR, "
                  f"{f'label smoothing {args.label_smoothing:g}, ' if args.label_smoothing else ''}"
                  f"{model.head.out_features} classes learnt (targets weighted {args.target_weight:g}x, "
                  f"{args.extra_fraction:.0%} of the others' images drawn each epoch), "
                  f"crop+flip{'+cutout' if args.cutout else ''} augmentation, "
                  f"{f'moving average of the weights (decay {args.weight_average:g}), ' if args.weight_average else ''}"
                  f"{'flip test-time augmentation, ' if flip_tta else ''}temperature scaling",
        "device": str(device),
        "precision": "bfloat16" if bfloat16 else "float32",
        "train_images": len(data["train"][0]),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,  # a steadier measure than wall time on a shared machine
        "history": history,
        "temperature": temperature,
        "threshold": threshold,
        "validation": {
            "accuracy": (validation_logits.argmax(1) == validation_labels).float().mean().item(),
            "ece_before_temperature": expected_calibration_error(torch.softmax(validation_logits, 1), validation_labels),
            "ece_after_temperature": expected_calibration_error(validation_probabilities, validation_labels),
            "at_threshold": selective(validation_probabilities, validation_labels, threshold),
        },
    }
    test = None
    if "test" in data:
        metrics["test"], test = test_report(model, data["test"], classes, temperature, threshold, flip_tta, device)
        at_threshold = metrics["test"]["at_threshold"]
        log(f"test accuracy {metrics['test']['accuracy']:.3f}; threshold {threshold:.4f} answers "
            f"{at_threshold['coverage']:.0%} of test images")
    log(f"trained in {train_seconds:.1f}s; validation accuracy {metrics['validation']['accuracy']:.3f}, "
        f"temperature {temperature:.3f}")

    model_dir.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.to("cpu").state_dict(), model_dir / "model.pt")
    settings = {"classes": classes, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
                "image_size": IMAGE_SIZE, "architecture": {"name": "resnet9", "width": args.width,
                                                           "num_outputs": model.head.out_features},
                "flip_tta": flip_tta, "temperature": temperature, "threshold": threshold,
                "target_accuracy": args.target_accuracy}
    (model_dir / "model.json").write_text(json.dumps(settings, indent=2) + "\n")
    (model_dir / "code").mkdir(exist_ok=True)
    shutil.copyfile(__file__, model_dir / "code" / "inference.py")
    for directory in (output_dir, model_dir):
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot(output_dir, metrics, test)
    write_report(output_dir, metrics)
    log(f"report: {output_dir / 'report.html'}")


if __name__ == "__main__":
    main()
