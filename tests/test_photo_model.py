"""The photo recipe (`--architecture efficientnet_lite0`): frozen ImageNet features, a head that answers neither,
served as TorchScript by the model's own code/inference.py."""

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from test_fit import reviewed_photos  # noqa: E402

from local.endpoint.handler import load_inference_handler  # noqa: E402
from training import etl  # noqa: E402
from training.fit import fit_local  # noqa: E402

pytestmark = pytest.mark.slow

CLASSES = ("bicycle", "motorcycle")
NEITHER_CLASS = "bus"  # staged after the targets: learnt as neither
PHOTO = {"architecture": "efficientnet_lite0", "neither_per_class": 100}


def photos_to_check(root: Path, data_dir: Path) -> Path:
    """bicycle/ and motorcycle/ of five staged test images each, car/ of two JPEGs made here and a file that is no
    photo."""
    for line in (data_dir / "test.lst").read_text().splitlines():
        _, label, relative = line.split("\t")
        if int(label) >= len(CLASSES):
            continue
        folder = root / CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        if len(list(folder.iterdir())) < 5:
            (folder / Path(relative).name).write_bytes((data_dir / relative).read_bytes())
    rng = np.random.default_rng(0)
    (root / "car").mkdir()
    for index in range(2):
        pixels = rng.integers(0, 256, (40 + 10 * index, 60, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "car" / f"{index}.jpg", format="JPEG")
    (root / "car" / "notes.txt").write_text("not a photo")
    return root


@pytest.fixture(scope="module")
def photo_model(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    etl.stage(etl.SHARED_ARCHIVE, data_dir, CLASSES + (NEITHER_CLASS,), progress=False)
    out = tmp_path_factory.mktemp("fit")
    checked = photos_to_check(tmp_path_factory.mktemp("check"), data_dir)
    labels = reviewed_photos(tmp_path_factory.mktemp("labels"))
    archive = fit_local(data_dir, out, labels, check_photos=checked, **PHOTO)
    model_dir = tmp_path_factory.mktemp("model")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        tar.extractall(model_dir, filter="data")
    handler = load_inference_handler(model_dir / "code", "scones_test_photo_inference")
    return {
        "names": names,
        "model_dir": model_dir,
        "data_dir": data_dir,
        "out": out,
        "checked": checked,
        "metrics": json.loads((out / "metrics.json").read_text()),
        "handler": handler,
        "model": handler.model_fn(str(model_dir)),
    }


def answer(photo_model, body: bytes, content_type: str) -> list[float]:
    handler = photo_model["handler"]
    data = handler.input_fn(body, content_type)
    answer, _ = handler.output_fn(handler.predict_fn(data, photo_model["model"]), "application/json")
    return json.loads(answer)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_photo_model_is_served_as_torchscript_with_its_geometry(photo_model):
    assert {"model.ts", "model.json", "code/inference.py", "code/model.py"} <= photo_model["names"]
    assert "model.pt" not in photo_model["names"]
    settings = json.loads((photo_model["model_dir"] / "model.json").read_text())
    assert settings["classes"] == list(CLASSES)
    assert (settings["image_size"], settings["resize"], settings["neither"]) == (128, "crop", True)
    assert settings["threshold"] == photo_model["metrics"]["threshold"]


def test_served_answers_are_the_test_probabilities_training_computed(photo_model):
    for prediction in photo_model["metrics"]["test"]["predictions"][:5]:
        body = (photo_model["data_dir"] / prediction["image"]).read_bytes()
        assert answer(photo_model, body, "image/png") == pytest.approx(prediction["probabilities"], abs=1e-5)


def test_answers_leave_room_for_neither_and_a_bus_is_more_often_neither_than_a_bicycle(photo_model):
    cifar = etl.read_archive(etl.SHARED_ARCHIVE)
    names = cifar.fine_label_names
    labels = np.asarray(cifar.test.fine_labels)
    images = cifar.test.data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    def neither(name: str) -> float:
        rows = np.flatnonzero(labels == names.index(name))[:20]
        answers = [answer(photo_model, png(images[row]), "image/png") for row in rows]
        assert all(len(probabilities) == 2 and sum(probabilities) <= 1 + 1e-6 for probabilities in answers)
        return float(np.mean([1 - sum(probabilities) for probabilities in answers]))

    assert neither(NEITHER_CLASS) > neither("bicycle") + 0.1


def test_a_photo_of_any_shape_is_answered(photo_model):
    buffer = io.BytesIO()
    Image.new("RGB", (1200, 500), (90, 120, 200)).save(buffer, format="JPEG")
    probabilities = answer(photo_model, buffer.getvalue(), "image/jpeg")
    assert len(probabilities) == 2 and 0 <= sum(probabilities) <= 1 + 1e-6


def test_the_metrics_record_the_recipe_and_how_often_neither_images_were_accepted(photo_model):
    metrics = photo_model["metrics"]
    assert metrics["recipe"].startswith("EfficientNet-Lite0")
    assert metrics["history"] and {"epoch", "train_loss", "validation_loss", "validation_accuracy"} <= set(
        metrics["history"][-1]
    )
    assert 0 <= metrics["validation"]["neither_accepted"] <= 1
    assert 0 < metrics["threshold"] <= 1


def test_the_reviewed_photos_of_the_labels_channel_are_learnt_and_bad_files_listed(photo_model):
    labels = photo_model["metrics"]["labels"]
    assert sum(sum(split.values()) for split in labels["counts"].values()) == 12
    assert sorted(skipped["path"] for skipped in labels["skipped"]) == ["bicycle/notes.txt", "car/a.png"]


def test_the_check_on_labelled_photos_is_in_the_metrics_and_the_report(photo_model):
    """`fit --local --check-photos DIR`: each photo answered through the model's serving code, as here."""
    photos, threshold = photo_model["metrics"]["real_photos"], photo_model["metrics"]["threshold"]
    assert photos["folder"] == str(photo_model["checked"])
    assert photos["photos"] == {"bicycle": 5, "motorcycle": 5, "car": 2}  # notes.txt is no photo
    kind = {".jpg": "image/jpeg", ".png": "image/png"}
    served = {
        a["file"]: answer(photo_model, (photo_model["checked"] / a["file"]).read_bytes(), kind[a["file"][-4:]])
        for a in photos["answers"]
    }
    targets = [name for name in served if not name.startswith("car/")]

    def three_way(p):
        return max(zip([*p, 1 - sum(p)], ["bicycle", "motorcycle", "neither"], strict=True))[1]

    accepted = [name for name in targets if max(served[name]) >= threshold]
    assert accepted  # thumbnails of the staged test split: the check has answers to count
    assert photos["right"] == round(sum(three_way(served[n]) == n.split("/")[0] for n in targets) / 10, 4)
    at = photos["at_model_threshold"]
    assert at["threshold"] == threshold and at["accepted"] == len(accepted) / 10
    two_way = {name: "bicycle" if served[name][0] >= served[name][1] else "motorcycle" for name in accepted}
    assert at["accepted_right"] == round(sum(two_way[n] == n.split("/")[0] for n in accepted) / len(accepted), 4)
    assert at["car_accepted"] == sum(max(served[n]) >= threshold for n in ("car/0.jpg", "car/1.jpg")) / 2

    report = (photo_model["out"] / "report.html").read_text()
    assert f"<th>real photos answered right</th><td>{photos['right']:.1%}</td>" in report
    assert f"<th>car photos accepted</th><td>{at['car_accepted']:.1%}</td>" in report
    assert 'alt="Real photos: the answer' in report and (photo_model["out"] / "real_photos.png").is_file()
