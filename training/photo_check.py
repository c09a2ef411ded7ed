"""How a trained model answers a folder of labelled photographs, each sent through the model's own
`code/inference.py` as the endpoint serves it: `training.fit --local --check-photos DIR` puts the figures in
metrics.json (`real_photos`) and the model report, and bench/realphotos.py scores seeds with them.

DIR holds `bicycle/` and `motorcycle/` and any other folders (`car/`, `other/`, ...), whose photos show neither: a
model should not accept them. Figures: on the bicycle and motorcycle photos, `right` (the most likely of bicycle,
motorcycle and neither, `1 - sum`, is the true class) and `right_two_way` (the larger of the two); at the model's
threshold, and at the classic 0.80 and 0.93, the share `accepted` (max(p) >= threshold) and `accepted_right`
(accuracy among those), per class too, and the share of each other folder's photos accepted (`car_accepted`, ...).
Photos only measure here: nothing learns from them.
"""

import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from stacks.config import IMAGE_SUFFIXES
from training.calibration import CLASSIC_THRESHOLDS

TARGETS = ("bicycle", "motorcycle")  # the answer's label order


class PhotoFolderError(ValueError):
    """The folder is not one of labelled photos; the message says what it needs."""


def content_type(body: bytes, path: Path) -> str:
    """What a phone's upload would say: by the file's signature, else by its name."""
    if body.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if body.startswith(b"\xff\xd8"):
        return "image/jpeg"
    return "image/png" if path.suffix.lower() == ".png" else "image/jpeg"


def read_photos(folder: Path) -> list[tuple[str, str, bytes, str]]:
    """(name relative to folder, class folder, bytes, content type) of each photo, targets first, sorted by name."""
    folder = Path(folder)
    if not all((folder / label).is_dir() for label in TARGETS):
        raise PhotoFolderError(f"{folder} has no {' and '.join(f'{t}/' for t in TARGETS)} folders of photos")
    others = sorted(path.name for path in folder.iterdir() if path.is_dir() and path.name not in TARGETS)
    photos = []
    for label in (*TARGETS, *others):
        for path in sorted((folder / label).iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                body = path.read_bytes()
                photos.append((f"{label}/{path.name}", label, body, content_type(body, path)))
    empty = [f"{label}/" for label in TARGETS if not any(photo[1] == label for photo in photos)]
    if empty:
        raise PhotoFolderError(f"{folder} has no {', '.join(IMAGE_SUFFIXES)} photo in {' and '.join(empty)}")
    return photos


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def answer(handler, model, body: bytes, kind: str) -> tuple[list[float] | None, float, str | None]:
    """The served probabilities, the seconds input_fn + predict_fn took, and the error if the model refused."""
    from local.endpoint.handler import answer_of

    started = time.perf_counter()
    try:
        prediction = handler.predict_fn(handler.input_fn(body, kind), model)
    except Exception as error:  # the endpoint would answer 4xx/5xx: counted as not right, not accepted
        return None, time.perf_counter() - started, f"{type(error).__name__}: {error}"
    seconds = time.perf_counter() - started
    text, _ = answer_of(handler.output_fn(prediction, "application/json"), "application/json")
    return [float(p) for p in json.loads(text)], seconds, None


def share(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def rounded(p: list[float] | None) -> list[float] | None:
    return None if p is None else [round(value, 4) for value in p]


def three_way(p: list[float]) -> str:
    """The most likely of bicycle, motorcycle and neither (ties to the first)."""
    scores = [p[0], p[1], max(0.0, 1.0 - p[0] - p[1])]
    return (*TARGETS, "neither")[scores.index(max(scores))]


def two_way(p: list[float]) -> str:
    return TARGETS[0] if p[0] >= p[1] else TARGETS[1]


def at_threshold(answers: list[dict], threshold: float) -> dict:
    """Accepted share and accuracy among accepted, overall and per class, and each other folder's share accepted."""
    accepted = lambda a: a["p"] is not None and max(a["p"]) >= threshold  # noqa: E731
    figures = {"threshold": threshold}
    targets = [a for a in answers if a["class"] in TARGETS]
    for name, group in [("all", targets)] + [(label, [a for a in targets if a["class"] == label]) for label in TARGETS]:
        taken = [a for a in group if accepted(a)]
        figures[name] = {
            "accepted": share(len(taken), len(group)),
            "accepted_right": share(sum(two_way(a["p"]) == a["class"] for a in taken), len(taken)),
        }
    figures["accepted"], figures["accepted_right"] = figures["all"]["accepted"], figures["all"]["accepted_right"]
    del figures["all"]
    for label in dict.fromkeys(a["class"] for a in answers if a["class"] not in TARGETS):
        group = [a for a in answers if a["class"] == label]
        figures[f"{label}_accepted"] = share(sum(accepted(a) for a in group), len(group))
    figures["accepted_wrong_files"] = [a["file"] for a in targets if accepted(a) and two_way(a["p"]) != a["class"]]
    figures["accepted_non_vehicle_files"] = [a["file"] for a in answers if a["class"] not in TARGETS and accepted(a)]
    return figures


def accepted_shares(at: dict) -> dict:
    """An at_threshold result's shares: accepted and right among them, then accepted per target and per other folder."""
    return {
        "accepted": at["accepted"],
        "accepted_right": at["accepted_right"],
        **{f"{label}_accepted": at[label]["accepted"] for label in TARGETS},
        **{key: value for key, value in at.items() if key.endswith("_accepted")},
    }


def score_model_dir(model_dir: Path, photos: list[tuple[str, str, bytes, str]], name: str) -> dict:
    """Every figure of the model in `model_dir` (model.json, code/), served through its own code/inference.py."""
    from local.endpoint.handler import load_inference_handler

    settings = json.loads((model_dir / "model.json").read_text())
    handler = load_inference_handler(model_dir / "code", f"scones_photo_check_{name}")
    model = handler.model_fn(str(model_dir))
    answers, seconds, errors = [], [], {}
    for file, label, body, kind in photos:
        p, took, error = answer(handler, model, body, kind)
        answers.append({"file": file, "class": label, "p": p})
        seconds.append(took)
        if error:
            errors[file] = error
    threshold = settings["threshold"]
    targets = [a for a in answers if a["class"] in TARGETS]
    right = lambda a, way: a["p"] is not None and way(a["p"]) == a["class"]  # noqa: E731
    figures = {
        "threshold": threshold,
        "temperature": settings.get("temperature"),
        "photos": {label: sum(a["class"] == label for a in answers) for label in dict.fromkeys(a[1] for a in photos)},
        "right": share(sum(right(a, three_way) for a in targets), len(targets)),
        "right_two_way": share(sum(right(a, two_way) for a in targets), len(targets)),
    }
    for label in TARGETS:
        group = [a for a in targets if a["class"] == label]
        figures[f"{label}_right"] = share(sum(right(a, three_way) for a in group), len(group))
        figures[f"{label}_right_two_way"] = share(sum(right(a, two_way) for a in group), len(group))
    figures["at_model_threshold"] = at_threshold(answers, threshold)
    figures["at_classic_thresholds"] = [at_threshold(answers, t) for t in CLASSIC_THRESHOLDS]
    figures["latency_ms_p50"] = round(1000 * statistics.median(seconds), 2) if seconds else None
    figures["latency_ms_p90"] = round(1000 * percentile(seconds, 0.9), 2) if seconds else None
    figures["wrong"] = [
        {"file": a["file"], "answer": None if a["p"] is None else three_way(a["p"]), "p": rounded(a["p"])}
        for a in targets
        if not right(a, three_way)
    ]
    figures["non_vehicles_accepted"] = [
        {"file": a["file"], "p": rounded(a["p"])}
        for a in answers
        if a["file"] in figures["at_model_threshold"]["accepted_non_vehicle_files"]
    ]
    figures["errors"] = errors
    figures["answers"] = [{**a, "p": rounded(a["p"])} for a in answers]
    return figures


def score(archive: Path, photos: list[tuple[str, str, bytes, str]], name: str) -> dict:
    """score_model_dir of a model.tar.gz, with the archive's path and what its metrics.json says of the training."""
    with tempfile.TemporaryDirectory(prefix="scones-photo-check-") as model_dir:
        with tarfile.open(archive) as tar:
            tar.extractall(model_dir, filter="data")
        metrics_path = Path(model_dir) / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        figures = score_model_dir(Path(model_dir), photos, name)
    return {
        "model": str(archive),
        **figures,
        "cifar_test_accuracy": metrics.get("test", {}).get("accuracy"),
        **{key: metrics.get(key) for key in ("recipe", "hyperparameters", "precision", "train_seconds")},
    }
