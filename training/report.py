"""The model report of a local fit: PNG plots and one self-contained `report.html`, from its metrics.json.

`training.fit --local` writes them after the training script has run; neither the training container nor the
serving container carries this module (or matplotlib).
"""

import base64
import html
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from training.calibration import CALIBRATION_BINS
from training.inference import to_pixels
from training.photo_check import TARGETS

PICTURES = {
    "training_curves": "Training curves",
    "confusion_matrix": "Confusion matrix (test split)",
    "reliability_diagram": "Reliability diagram (test split)",
    "test_predictions": "Test images with predictions (wrong ones in red)",
    "real_photos": "Real photos: the answer's confidence by folder (accepted right of the dashed threshold)",
}


def write(output_dir: Path, data_dir: Path) -> None:
    """The plots and report.html beside `output_dir/metrics.json`; `data_dir` holds the test images it names."""
    output_dir = Path(output_dir)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    plot(output_dir, metrics, test_for_plots(metrics, Path(data_dir)))
    write_report(output_dir, metrics)


def test_for_plots(metrics: dict, data_dir: Path) -> dict | None:
    """The test images, labels, predictions and probabilities (as served, and before the temperature)."""
    if "test" not in metrics:
        return None
    predictions = metrics["test"]["predictions"]
    probabilities = np.array([entry["probabilities"] for entry in predictions], dtype=np.float64)
    # softmax(logits / T) is served; softmax(T * log p) gives back softmax(logits), the answers before it
    with np.errstate(divide="ignore"):
        scaled = metrics["temperature"] * np.log(probabilities)
    raw = np.exp(scaled - scaled.max(1, keepdims=True))
    return {
        "images": [load_image(data_dir, entry["image"]) for entry in predictions],
        "labels": [entry["label"] for entry in predictions],
        "predicted": probabilities.argmax(1).tolist(),
        "probabilities": probabilities,
        "raw_probabilities": raw / raw.sum(1, keepdims=True),
    }


def load_image(data_dir: Path, relative: str) -> np.ndarray:
    """The 3x32x32 pixels the model saw of a test image named as in test.lst."""
    path = data_dir / relative
    if not path.is_file():  # as the training script finds it: a channel may hold `x.png` for `test/x.png`
        path = data_dir / Path(relative).name
    with Image.open(path) as image:
        return to_pixels(image)


def plot(output_dir: Path, metrics: dict, test: dict | None) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr, flush=True)
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
    for axis, title in zip(axes, ("loss", "accuracy", "learning rate (epoch start)"), strict=True):
        axis.set(title=title, xlabel="epoch")
    axes[0].legend()
    axes[1].legend()
    save(figure, output_dir / "training_curves.png")
    if "real_photos" in metrics:
        plot_real_photos(output_dir, metrics["real_photos"], plt)
    if test is None:
        return

    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for label, predicted in zip(test["labels"], test["predicted"], strict=True):
        confusion[label, predicted] += 1
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.imshow(confusion, cmap="Blues")
    for (row, column), count in np.ndenumerate(confusion):
        axis.text(
            column, row, str(count), ha="center", va="center", color="white" if count > confusion.max() / 2 else "black"
        )
    axis.set(
        xticks=range(len(classes)),
        xticklabels=classes,
        yticks=range(len(classes)),
        yticklabels=classes,
        xlabel="predicted",
        ylabel="true",
        title=f"test accuracy {metrics['test']['accuracy']:.3f}",
    )
    save(figure, output_dir / "confusion_matrix.png")

    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], "k:", label="perfect calibration")
    labels = np.array(test["labels"])
    for name, probabilities in (
        ("before temperature", test["raw_probabilities"]),
        ("after temperature", test["probabilities"]),
    ):
        confidence, correct = probabilities.max(1), probabilities.argmax(1) == labels
        bins = np.minimum((confidence * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
        used = [b for b in range(CALIBRATION_BINS) if (bins == b).any()]
        axis.plot(
            [confidence[bins == b].mean() for b in used], [correct[bins == b].mean() for b in used], "o-", label=name
        )
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
            confidence = test["probabilities"][index].max()
            wrong = predicted != label
            axis.set_title(
                f"{'✗ ' if wrong else ''}{classes[predicted]} {confidence:.2f}",
                fontsize=7,
                color="red" if wrong else "black",
            )
    figure.suptitle("test images: prediction and confidence (wrong ones in red with ✗)")
    save(figure, output_dir / "test_predictions.png")


def plot_real_photos(output_dir: Path, photos: dict, plt) -> None:
    """Each photo's confidence (max p) on the row of its folder: targets green when the larger class is right, red
    when wrong; other folders' photos grey, orange when accepted."""
    folders = list(photos["photos"])
    threshold = photos["threshold"]
    rng = np.random.default_rng(0)
    figure, axis = plt.subplots(figsize=(8, 0.8 + 0.7 * len(folders)))
    for row, folder in enumerate(folders):
        answered = [a for a in photos["answers"] if a["class"] == folder and a["p"] is not None]
        confidence = np.array([max(a["p"]) for a in answered])
        if folder in TARGETS:
            right = np.array([TARGETS[int(a["p"][1] > a["p"][0])] == folder for a in answered], dtype=bool)
            colours = np.where(right, "tab:green", "tab:red")
        else:
            colours = np.where(confidence >= threshold, "tab:orange", "tab:gray")
        axis.scatter(confidence, row + rng.uniform(-0.25, 0.25, len(answered)), s=12, c=colours)
    axis.axvline(threshold, linestyle="--", color="black")
    axis.set(
        yticks=range(len(folders)),
        yticklabels=[f"{folder} ({photos['photos'][folder]})" for folder in folders],
        xlim=(0, 1.01),
        xlabel="confidence: max(p_bicycle, p_motorcycle)",
        title=f"{photos['folder']}: right {photos['right']:.1%}, threshold {threshold:.3f}",
    )
    axis.invert_yaxis()
    save(figure, output_dir / "real_photos.png")


def write_report(output_dir: Path, metrics: dict) -> None:
    """report.html beside the plots: the figures that matter, then every plot, embedded so it opens from disk."""

    def percent(value):
        return "n/a" if value is None else f"{value:.1%}"

    rows = [
        ("classes", ", ".join(metrics["classes"])),
        ("recipe", metrics["recipe"]),
        (
            "training",
            f"{metrics['train_seconds']:.0f} s on {metrics['device']} ({metrics['precision']}), "
            f"{metrics['train_images']} images, seed {metrics['seed']}",
        ),
        ("validation accuracy", percent(metrics["validation"]["accuracy"])),
        (
            "threshold",
            f"{metrics['threshold']:.4f} (accepted validation answers right at least "
            f"{metrics['hyperparameters']['target_accuracy']:.0%} of the time"
            + (
                f", at most {metrics['hyperparameters']['max_neither_accepted']:.0%} of neither images accepted)"
                if "threshold_for_neither" in metrics
                else ")"
            ),
        ),
    ]
    test = metrics.get("test")
    if test:
        rows += [
            ("test accuracy", f"{percent(test['accuracy'])} of {test['images']} images"),
            *(
                (f"{name}: precision, recall", f"{percent(score['precision'])}, {percent(score['recall'])}")
                for name, score in test["per_class"].items()
            ),
            *(
                (
                    f"at threshold {entry['threshold']:.4g}",
                    f"answers {percent(entry['coverage'])} of test images, {percent(entry['accuracy'])} of them right",
                )
                for entry in (test["at_threshold"], *test["at_classic_thresholds"])
            ),
            (
                "calibration error (test)",
                f"{test['ece_before_temperature']:.3f} before the temperature, "
                f"{test['ece_after_temperature']:.3f} after",
            ),
        ]
    photos = metrics.get("real_photos")
    if photos:
        at = photos["at_model_threshold"]
        others = [folder for folder in photos["photos"] if folder not in TARGETS]
        rows += [
            (
                "real photos",
                f"{sum(photos['photos'][t] for t in TARGETS)} of bicycles and motorcycles, "
                f"{sum(photos['photos'][f] for f in others)} of other things, in {photos['folder']}",
            ),
            ("real photos answered right", percent(photos["right"])),
            (
                f"real photos at threshold {at['threshold']:.4g}",
                f"{percent(at['accepted'])} accepted, {percent(at['accepted_right'])} of them right",
            ),
            *((f"{folder} photos accepted", percent(at[f"{folder}_accepted"])) for folder in others),
        ]
    table = "".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>" for name, value in rows)
    figures = "".join(
        f'<h2>{title}</h2><img alt="{title}" src="data:image/png;base64,'
        f'{base64.b64encode((output_dir / f"{name}.png").read_bytes()).decode()}">'
        for name, title in PICTURES.items()
        if (output_dir / f"{name}.png").is_file()
    )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Model report</title><style>'
        "body{font-family:sans-serif;margin:2em;max-width:80em}th{text-align:left;padding-right:2em}"
        "img{max-width:100%}</style></head><body><h1>Model report</h1>"
        f"<table>{table}</table>{figures}</body></html>\n"
    )
    partial = output_dir / ".report.html.partial"
    partial.write_text(page)
    os.replace(partial, output_dir / "report.html")


def save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(figure)
