"""Train the bicycle/motorcycle classifier: the entry point of SageMaker's PyTorch container (script mode).

Measured (`bench/train.py`, 3 seeds, 2 CPU cores): the default recipe (`--architecture efficientnet_lite0`,
training/backbone.py) 0.90, 0.91, 0.92 on the 100 CIFAR-100 test images of the two classes in 57 to 59 s of
training, and on real photos 0.955 to 0.970 right (`bench/realphotos.py`); the 32-px network
(`--architecture resnet9`, in bfloat16) 0.94, 0.96, 0.94 in 111 to 112 s, 0.88 of the photos right.

The same script trains on this machine's CPU (`python -m training.fit --local` runs it as the container does)
and in SageMaker's container, run from the source directory `training.sourcedir` packs (this file, `model.py`,
`inference.py`, `calibration.py`; torch, numpy, Pillow and the standard library):

- hyperparameters as `--name value` arguments, images and `.lst` manifests from the `SM_CHANNEL_*`
  directories, the model to `SM_MODEL_DIR`, metrics.json to it and to `SM_OUTPUT_DATA_DIR`;
- the model is `model.pt` and `model.json`, with `inference.py` and `model.py` copied beside them as `code/`:
  the handler of SageMaker's PyTorch inference container.

The model answers the probabilities of the target classes, labels 0..target_classes-1, in label order,
e.g. `[p_bicycle, p_motorcycle]`. The default recipe learns the images of further labels as "neither" and serves
`model.ts` (`main_photo`, training/backbone.py). With `--architecture resnet9`, a temperature is fitted on the
targets' validation images, and images of further labels in the manifests (other classes staged after the
targets) are learnt alongside as more outputs of the same network, their loss weighted below the targets'
(`--target_weight`) and a share of them drawn afresh for each epoch
(`--extra_fraction`): they sharpen its features, and their validation images join the training set, as only
the target classes are validated.
"""

import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__:  # imported from this repository as training.train
    from .calibration import (
        choose_threshold,
        expected_calibration_error,
        fit_temperature,
        gate_lines,
        selective,
        test_report,
    )
    from .data import channel, class_names, image_path, labelled_photos, load_data, log, read_manifest
    from .hyperparameters import AUTO, HyperparameterError, parse_hyperparameters
    from .inference import to_inputs
    from .model import IMAGE_SIZE, Classifier, target_logits
else:  # run as a script from the source directory, as SageMaker runs it
    from calibration import (
        choose_threshold,
        expected_calibration_error,
        fit_temperature,
        gate_lines,
        selective,
        test_report,
    )
    from data import channel, class_names, image_path, labelled_photos, load_data, log, read_manifest
    from hyperparameters import AUTO, HyperparameterError, parse_hyperparameters
    from inference import to_inputs
    from model import IMAGE_SIZE, Classifier, target_logits

# What the serving container needs, copied from beside this file into the model as code/.
SERVING_CODE = ("inference.py", "model.py")
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
        return torch.cat(
            [
                target_logits(model, to_inputs(batch).to(device), num_classes, flip_tta).cpu()
                for batch in np.array_split(images, max(1, math.ceil(len(images) / 500)))
            ]
        )


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
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        momentum=0.9,
        nesterov=True,
    )
    target_rows = torch.nonzero(train_labels < num_classes).flatten()
    extra_rows = torch.nonzero(train_labels >= num_classes).flatten()
    extras_per_epoch = round(args.extra_fraction * len(extra_rows))
    epoch_size = len(target_rows) + extras_per_epoch
    batch_size = min(args.batch_size, epoch_size)
    steps_per_epoch = epoch_size // batch_size
    averaged = copy.deepcopy(model)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.learning_rate, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )
    validation_images, validation_labels = data["validation"][0], torch.as_tensor(data["validation"][1])

    history = []
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        rows = torch.cat(
            [target_rows, extra_rows[torch.randperm(len(extra_rows), generator=generator)[:extras_per_epoch]]]
        )
        order = rows[torch.randperm(len(rows), generator=generator)]
        loss_sum = correct = seen = 0
        lr = schedule.get_last_lr()[0]
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
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
        record = {
            "epoch": epoch,
            "lr": lr,
            "images": seen,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "validation_loss": F.cross_entropy(logits, validation_labels).item(),
            "validation_accuracy": (logits.argmax(1) == validation_labels).float().mean().item(),
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        log(
            f"epoch {epoch:3d}/{args.epochs}  lr {lr:.4f}  train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.3f}  validation loss {record['validation_loss']:.4f} "
            f"acc {record['validation_accuracy']:.3f}  {record['seconds']:.0f}s"
        )
    return averaged, history


def update_average(averaged: Classifier, model: Classifier, decay: float, step: int) -> None:
    """One step of the exponential moving average of the weights and batch-norm statistics. The decay is lower
    for the first steps, so that the initial weights do not linger in the average of a short run."""
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for kept, current in zip(averaged.state_dict().values(), model.state_dict().values(), strict=True):
            if kept.dtype.is_floating_point:
                kept.lerp_(current, 1 - decay)
            else:
                kept.copy_(current)


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    try:
        args = parse_hyperparameters(sys.argv[1:] if argv is None else argv)
    except HyperparameterError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    model_dir = Path(os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    output_dir = Path(os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, on a GPU
    torch.use_deterministic_algorithms(True, warn_only=True)  # a few CUDA kernels have no deterministic variant
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bfloat16 = use_bfloat16(args.bfloat16, device)
    for name, value in AUTO["bfloat16" if bfloat16 else "float32"].items():
        if getattr(args, name) == "auto":
            setattr(args, name, value)

    if args.architecture == "efficientnet_lite0":
        main_photo(args, model_dir, output_dir)
        return
    loading = time.perf_counter()
    num_classes = args.target_classes
    data, classes = load_data(num_classes)
    log(
        f"{len(data['train'][0])} training, {len(data['validation'][0])} validation, "
        f"{len(data['test'][0]) if 'test' in data else 0} test images loaded in "
        f"{time.perf_counter() - loading:.1f}s; classes {classes}; device {device}, "
        f"{'bfloat16' if bfloat16 else 'float32'}"
    )

    make_directories(model_dir, output_dir)
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
        **({"labels": data["labels"]} if "labels" in data else {}),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,  # a steadier measure than wall time on a shared machine
        "history": history,
        "temperature": temperature,
        "threshold": threshold,
        "validation": {
            "accuracy": (validation_logits.argmax(1) == validation_labels).float().mean().item(),
            "ece_before_temperature": expected_calibration_error(
                torch.softmax(validation_logits, 1), validation_labels
            ),
            "ece_after_temperature": expected_calibration_error(validation_probabilities, validation_labels),
            "at_threshold": selective(validation_probabilities, validation_labels, threshold),
        },
    }
    if "test" in data:
        images, labels, paths = data["test"]
        logits = evaluate(model, images, num_classes, flip_tta, device)
        served = torch.softmax(logits / temperature, dim=1)
        metrics["test"] = test_report(torch.softmax(logits, 1), served, labels, paths, classes, threshold)
        log_test(metrics)
    log(
        f"trained in {train_seconds:.1f}s; validation accuracy {metrics['validation']['accuracy']:.3f}, "
        f"temperature {temperature:.3f}"
    )

    torch.save(model.to("cpu").state_dict(), model_dir / "model.pt")
    settings = {
        "classes": classes,
        "mean": model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist(),
        "image_size": IMAGE_SIZE,
        "architecture": model.architecture(),
        "flip_tta": flip_tta,
        "temperature": temperature,
        "threshold": threshold,
        "target_accuracy": args.target_accuracy,
    }
    write_model(model_dir, output_dir, settings, metrics)


def log_test(metrics: dict) -> None:
    log(
        f"test accuracy {metrics['test']['accuracy']:.3f}; threshold {metrics['threshold']:.4f} answers "
        f"{metrics['test']['at_threshold']['coverage']:.0%} of test images"
    )


def write_model(model_dir: Path, output_dir: Path, settings: dict, metrics: dict) -> None:
    """model.json, the serving code as code/, and metrics.json (beside the model and in the output data).

    Prints the figures of the evaluation gate as `scones-<name>=<value>` lines, which the training stack's
    SageMaker metric definitions read (stacks/registry.py): the training state machine gates the model on
    them and registers it with them.
    """
    for line in gate_lines(settings, metrics):
        print(line, flush=True)
    (model_dir / "model.json").write_text(json.dumps(settings, indent=2) + "\n")
    (model_dir / "code").mkdir(exist_ok=True)
    for name in SERVING_CODE:
        shutil.copyfile(Path(__file__).with_name(name), model_dir / "code" / name)
    for directory in (output_dir, model_dir):
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def make_directories(*directories: Path) -> None:
    for directory in directories:  # after the data is found, before training
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SystemExit(f"train.py: error: cannot create {directory}: {error.strerror}") from None


def main_photo(args, model_dir: Path, output_dir: Path) -> None:
    """The efficientnet_lite0 recipe (training/backbone.py), served as TorchScript: `model.ts`."""
    if __package__:
        from . import backbone
    else:
        import backbone
    rows, paths, listed = [], [], set()
    for name in ("train", "validation"):
        manifest = channel(f"{name}_lst") / f"{name}.lst"
        image_dir = channel(name)
        for label, relative in read_manifest(manifest):
            rows.append(label)
            paths.append(image_path(image_dir, relative, manifest))
            listed.add(relative)
    with tempfile.TemporaryDirectory() as staging:
        reviewed = labelled_photos(Path(staging), listed)
        for label, path, _ in [*reviewed[0]["train"], *reviewed[0]["validation"]] if reviewed else []:
            rows.append(label)
            paths.append(path)
        missing = sorted(set(range(args.target_classes)) - set(rows))
        if missing:
            raise SystemExit(f"train.py: error: no training or validation images of target labels {missing}")
        classes = class_names(args.target_classes, [channel("train_lst"), channel("train")])
        make_directories(model_dir, output_dir)
        metrics, settings, model = backbone.train_photo_model(args, paths, np.array(rows, dtype=np.int64), log)
    metrics = {
        "classes": classes,
        "seed": args.seed,
        "hyperparameters": vars(args),
        "device": "cpu",
        "precision": "float32",
        **metrics,
        **({"labels": reviewed[1]} if reviewed else {}),
    }
    test_dir, test_lst = channel("test", required=False), channel("test_lst", required=False)
    if test_dir and test_lst and (test_lst / "test.lst").is_file():
        test = [(label, relative) for label, relative in read_manifest(test_lst / "test.lst") if label < len(classes)]
        if test:
            manifest = test_lst / "test.lst"
            read = backbone.read_image(args.image_size, args.resize)
            with torch.no_grad():
                images = torch.from_numpy(np.stack([read(image_path(test_dir, rel, manifest)) for _, rel in test]))
                logits = model(images.float().div(255))
            temperature, labels = metrics["temperature"], [label for label, _ in test]
            served = torch.softmax(logits / temperature, 1)[:, : len(classes)]
            raw = torch.softmax(logits, 1)[:, : len(classes)]
            metrics["test"] = test_report(raw, served, labels, [rel for _, rel in test], classes, metrics["threshold"])
            log_test(metrics)
    torch.jit.save(backbone.trace(model, args.image_size), model_dir / "model.ts")
    settings = {
        "classes": classes,
        "architecture": {"name": args.architecture, "num_outputs": len(classes) + 1},
        "flip_tta": False,
        "temperature": metrics["temperature"],
        "threshold": metrics["threshold"],
        "target_accuracy": args.target_accuracy,
        **settings,
    }
    write_model(model_dir, output_dir, settings, metrics)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: whoever pressed it knows; no traceback
        raise SystemExit(130) from None
