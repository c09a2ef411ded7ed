"""Calibration of the served probabilities on validation data: the temperature, the confidence threshold at
which accepted answers are right often enough, and the measures the metrics and the model report show."""

import math

import torch
import torch.nn.functional as F

CALIBRATION_BINS = 10
CLASSIC_THRESHOLDS = (0.80, 0.93)


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
            error += inside.float().mean().item() * abs(
                correct[inside].mean().item() - confidence[inside].mean().item()
            )
    return error


def choose_threshold(
    probabilities: torch.Tensor, labels: torch.Tensor, target_accuracy: float, at_least: float | None = None
) -> float:
    """The lowest confidence threshold (of the answers' confidences, and `at_least` when given, none below it) at
    which answers at or above it are right often enough (1.0 if none)."""
    confidence, predicted = probabilities.max(1)
    candidates = (
        set(confidence.tolist()) if at_least is None else {at_least, *confidence[confidence >= at_least].tolist()}
    )
    for threshold in sorted(candidates):
        accepted = confidence >= threshold
        if (predicted[accepted] == labels[accepted]).float().mean().item() >= target_accuracy:
            return threshold
    return 1.0


def choose_threshold_with_neither(
    probabilities: torch.Tensor, labels: torch.Tensor, target_accuracy: float, max_neither_accepted: float
) -> dict:
    """For a model that also answers neither: the lowest threshold at which the target images' accepted answers are
    right at least `target_accuracy` of the time and at most `max_neither_accepted` of the neither images (labels
    past the targets) are accepted. Each is a constraint of its own: counting neither images among the accepted
    answers instead would make the threshold depend on how many of them the calibration set holds, not on how
    often real traffic is neither. Answers {"threshold", "for_targets", "for_neither"}: the threshold, and the
    lowest that each constraint alone allows."""
    targets = probabilities.shape[1]
    is_target = labels < targets
    target_labels = labels[is_target]
    neither_confidence = probabilities[~is_target].max(1).values.sort(descending=True).values
    allowed = math.floor(max_neither_accepted * len(neither_confidence) + 1e-9)
    # Accepting at most `allowed` of them: just above the next one's confidence, in the dtype answers come in.
    for_neither = (
        min(1.0, float(torch.nextafter(neither_confidence[allowed], torch.ones((), dtype=neither_confidence.dtype))))
        if allowed < len(neither_confidence)
        else 0.0
    )
    for_targets = choose_threshold(probabilities[is_target], target_labels, target_accuracy)
    # Accuracy does not always rise with the threshold: above the neither bound it is checked again.
    threshold = choose_threshold(
        probabilities[is_target], target_labels, target_accuracy, at_least=max(for_targets, for_neither)
    )
    return {"threshold": threshold, "for_targets": for_targets, "for_neither": for_neither}


def selective(probabilities: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    """Share of answers at or above `threshold` (coverage) and their accuracy."""
    confidence, predicted = probabilities.max(1)
    accepted = confidence >= threshold
    return {
        "threshold": threshold,
        "coverage": accepted.float().mean().item(),
        "accuracy": (predicted[accepted] == labels[accepted]).float().mean().item() if accepted.any() else None,
    }


def class_report(predicted: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    report = {}
    for label, name in enumerate(classes):
        true_positives = ((predicted == label) & (labels == label)).sum().item()
        report[name] = {
            "precision": true_positives / max(1, (predicted == label).sum().item()),
            "recall": true_positives / max(1, (labels == label).sum().item()),
        }
    return report


def test_report(raw: torch.Tensor, probabilities: torch.Tensor, labels, paths, classes, threshold: float) -> dict:
    """Test metrics from the target probabilities before the temperature (`raw`) and as served, with every
    image's served probabilities (the model report plots them)."""
    label_tensor = torch.as_tensor(labels)
    predicted = probabilities.argmax(1)
    report = {
        "accuracy": (predicted == label_tensor).float().mean().item(),
        "images": len(labels),
        "per_class": class_report(predicted, label_tensor, classes),
        "ece_before_temperature": expected_calibration_error(raw, label_tensor),
        "ece_after_temperature": expected_calibration_error(probabilities, label_tensor),
        "at_threshold": selective(probabilities, label_tensor, threshold),
        "at_classic_thresholds": [selective(probabilities, label_tensor, t) for t in CLASSIC_THRESHOLDS],
        "predictions": [
            {"image": path, "label": int(label), "probabilities": row}
            for path, label, row in zip(paths, labels, probabilities.tolist(), strict=True)
        ],
    }
    return report


def gate_lines(settings: dict, metrics: dict) -> list[str]:
    """`scones-<name>=<value>` lines, which the training job's SageMaker metric definitions read
    (stacks/registry.py): the calibrated threshold and, where the training measured them, the test accuracy, the
    accuracy and coverage of the test answers accepted at the threshold, and the share of neither images accepted."""
    test = metrics.get("test", {})
    at_threshold = test.get("at_threshold", {})
    figures = {
        "threshold": settings["threshold"],
        "test-accuracy": test.get("accuracy"),
        "accepted-accuracy": at_threshold.get("accuracy"),
        "coverage": at_threshold.get("coverage"),
        "neither-accepted": metrics.get("validation", {}).get("neither_accepted"),
    }
    return [f"scones-{name}={value!r}" for name, value in figures.items() if value is not None]
