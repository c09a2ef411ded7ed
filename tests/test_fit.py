"""training.fit and training/train.py: a short real fit, its artifacts, and the model served by its own handler."""

import base64
import importlib.util
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from local.__main__ import SHARED_ARCHIVE as ARCHIVE  # noqa: E402
from training import etl, train  # noqa: E402
from training.fit import FitError, fit_local  # noqa: E402

pytestmark = pytest.mark.slow

CLASSES = ("bicycle", "motorcycle")
EXTRA_CLASS = "bus"  # staged after the targets: learnt alongside, never served
QUICK = {"epochs": 1, "width": 8, "batch_size": 32}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    etl.stage(ARCHIVE, out, CLASSES + (EXTRA_CLASS,), progress=False)
    return out


@pytest.fixture(scope="module")
def fitted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    archive = fit_local(data_dir, out, **QUICK)
    model_dir = tmp_path_factory.mktemp("model")
    with tarfile.open(archive) as tar:
        tar.extractall(model_dir, filter="data")
    return {"archive": archive, "out": out, "model_dir": model_dir,
            "metrics": json.loads((out / "metrics.json").read_text())}


def run_fit(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.fit", *arguments], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_archive_holds_the_model_in_sagemaker_layout(fitted):
    assert fitted["archive"] == fitted["out"] / "model.tar.gz"
    with tarfile.open(fitted["archive"]) as tar:
        names = set(tar.getnames())
    assert {"model.pt", "model.json", "metrics.json", "code/inference.py"} <= names
    assert (fitted["model_dir"] / "code" / "inference.py").read_bytes() == (ROOT / "training" / "train.py").read_bytes()
    settings = json.loads((fitted["model_dir"] / "model.json").read_text())
    assert settings["classes"] == list(CLASSES)
    assert settings["threshold"] == fitted["metrics"]["threshold"]
    assert settings["temperature"] == fitted["metrics"]["temperature"]
    assert not list(fitted["out"].glob(".model*")), "temporary files left behind"


def test_metrics_record_curves_test_results_and_calibration(fitted):
    metrics = fitted["metrics"]
    assert json.loads((fitted["model_dir"] / "metrics.json").read_text()) == metrics
    assert len(metrics["history"]) == QUICK["epochs"]
    assert {"epoch", "lr", "train_loss", "train_accuracy", "validation_loss",
            "validation_accuracy"} <= set(metrics["history"][0])
    assert metrics["hyperparameters"]["width"] == QUICK["width"] and metrics["seed"] == 0
    assert metrics["train_seconds"] > 0
    # bfloat16 "auto" trains in float32 where bfloat16 would be emulated (over 10x slower on such CPUs)
    native_bfloat16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert metrics["precision"] == ("bfloat16" if native_bfloat16 else "float32")
    test = metrics["test"]
    assert metrics["classes"] == list(CLASSES)
    assert metrics["train_images"] == 900 + 450 + 50  # the extra class's validation images train too
    # each epoch: every target image and a share of the extra class's (by default, by precision), in whole batches
    extra_fraction = train.AUTO[metrics["precision"]]["extra_fraction"]
    assert metrics["hyperparameters"]["extra_fraction"] == extra_fraction
    batch_size = QUICK["batch_size"]
    assert metrics["history"][0]["images"] == (900 + round(extra_fraction * 500)) // batch_size * batch_size
    assert test["images"] == 100 and len(test["predictions"]) == 100
    assert set(test["per_class"]) == set(CLASSES)
    assert {"precision", "recall"} == set(test["per_class"]["bicycle"])
    assert {"ece_before_temperature", "ece_after_temperature", "at_threshold"} <= set(test)
    assert [entry["threshold"] for entry in test["at_classic_thresholds"]] == [0.80, 0.93]
    correct = sum(max(range(2), key=p["probabilities"].__getitem__) == p["label"] for p in test["predictions"])
    assert test["accuracy"] == pytest.approx(correct / 100)


def test_plots_are_png_files(fitted):
    for name in ("training_curves", "confusion_matrix", "reliability_diagram", "test_predictions"):
        path = fitted["out"] / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()


def test_the_report_embeds_every_plot_and_states_the_test_accuracy(fitted):
    page = (fitted["out"] / "report.html").read_text()
    embedded = [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert embedded == [(fitted["out"] / f"{name}.png").read_bytes() for name in train.PICTURES]
    accuracy = fitted["metrics"]["test"]["accuracy"]
    assert f"<th>test accuracy</th><td>{accuracy:.1%} of 100 images</td>" in page
    assert not list(fitted["out"].glob(".report*")), "temporary files left behind"


def load_handler(model_dir: Path):
    spec = importlib.util.spec_from_file_location("served_inference", model_dir / "code" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_served_model_answers_what_training_evaluated(fitted, data_dir):
    handler = load_handler(fitted["model_dir"])
    model = handler.model_fn(str(fitted["model_dir"]))
    for expected in fitted["metrics"]["test"]["predictions"]:
        body, content_type = handler.output_fn(
            handler.predict_fn(handler.input_fn((data_dir / expected["image"]).read_bytes(), "image/png"), model),
            "application/json")
        assert content_type == "application/json"
        assert json.loads(body) == pytest.approx(expected["probabilities"], abs=1e-5)


def test_handler_takes_any_image_size_and_mode_and_refuses_what_it_cannot_read(fitted):
    handler = load_handler(fitted["model_dir"])
    model = handler.model_fn(fitted["model_dir"])
    jpeg = io.BytesIO()
    Image.new("L", (100, 60), 128).save(jpeg, format="JPEG")
    for body, content_type in ((jpeg.getvalue(), "image/jpeg"), (jpeg.getvalue(), "application/x-image")):
        probabilities = json.loads(handler.output_fn(handler.predict_fn(handler.input_fn(body, content_type), model),
                                                     "application/json")[0])
        assert len(probabilities) == 2 and sum(probabilities) == pytest.approx(1)
    with pytest.raises(ValueError, match="unsupported content type 'text/csv'"):
        handler.input_fn(b"1,2,3", "text/csv")
    with pytest.raises(ValueError, match="not a decodable image"):
        handler.input_fn(b"not an image", "image/png")


def test_fit_is_deterministic_for_a_seed(fitted, data_dir, tmp_path):
    fit_local(data_dir, tmp_path, **QUICK)
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again["test"]["predictions"] == fitted["metrics"]["test"]["predictions"]


@pytest.mark.parametrize("arguments, message", [
    (["--epochs", "0"], "argument --epochs: 0 is outside the valid range [1, 1000]"),
    (["--epochs", "many"], "argument --epochs: 'many' is not an int or auto; valid range [1, 1000]"),
    (["--learning_rate", "fast"], "argument --learning_rate: 'fast' is not a float; valid range [1e-06, 10.0]"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--bfloat16", "yes"], "argument --bfloat16: 'yes' is not one of auto, 1, 0"),
])
def test_bad_hyperparameters_give_one_line_errors(data_dir, tmp_path, arguments, message):
    finished = run_fit("--local", "--data", str(data_dir), "--out", str(tmp_path), *arguments)
    assert finished.returncode == 2
    assert finished.stderr == f"fit: error: {message}\n"
    with pytest.raises(FitError, match="outside the valid range"):
        fit_local(data_dir, tmp_path, epochs=0)


def test_missing_data_gives_one_line_errors(tmp_path):
    finished = run_fit("--local", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert finished.returncode == 2
    assert finished.stderr == f"fit: error: data folder {tmp_path / 'nowhere'} does not exist " \
                              "(stage it with `python -m training.etl`)\n"
    (tmp_path / "train.lst").write_text("")
    finished = run_fit("--local", "--data", str(tmp_path), "--out", str(tmp_path / "out"))
    assert finished.returncode == 2
    assert finished.stderr == f"fit: error: data folder {tmp_path} has no validation.lst " \
                              "(stage it with `python -m training.etl`)\n"


def test_help_lists_the_hyperparameters():
    finished = run_fit("--help")
    assert finished.returncode == 0
    assert all(f"--{name}" in finished.stdout for name in train.HYPERPARAMETERS)


def test_threshold_is_the_lowest_confidence_keeping_the_target_accuracy():
    probabilities = torch.tensor([[0.95, 0.05], [0.1, 0.9], [0.2, 0.8], [0.7, 0.3]])
    labels = torch.tensor([0, 1, 0, 0])  # the 0.8-confident answer is wrong
    assert train.choose_threshold(probabilities, labels, 0.99) == pytest.approx(0.9)
    assert train.choose_threshold(probabilities, labels, 0.75) == pytest.approx(0.7)
    assert train.selective(probabilities, labels, 0.9) == {"threshold": 0.9, "coverage": 0.5, "accuracy": 1.0}


def test_temperature_minimises_validation_loss():
    logits = torch.tensor([[4.0, -4.0], [3.0, -3.0], [-2.0, 2.0], [2.0, -2.0]])
    labels = torch.tensor([0, 0, 1, 1])
    temperature = train.fit_temperature(logits, labels)
    loss = lambda t: torch.nn.functional.cross_entropy(logits / t, labels).item()  # noqa: E731
    assert loss(temperature) <= min(loss(temperature * 0.9), loss(temperature * 1.1), loss(1.0))


def test_temperature_is_left_at_1_when_every_validation_answer_is_right():
    """Else the loss keeps falling as the temperature does, and the served probabilities would all be near 1."""
    logits = torch.tensor([[4.0, -4.0], [3.0, -3.0], [-2.0, 2.0], [0.5, -0.5]])
    assert train.fit_temperature(logits, torch.tensor([0, 0, 1, 0])) == 1.0


def test_images_are_found_where_sagemaker_puts_them(data_dir):
    """On SageMaker the `train` channel may hold `x.png` where the manifest says `train/x.png`."""
    as_staged = train.load_split(data_dir, data_dir / "validation.lst")
    as_downloaded = train.load_split(data_dir / "train", data_dir / "validation.lst")
    assert len(as_staged[0]) == 150
    assert (as_staged[0] == as_downloaded[0]).all() and (as_staged[1] == as_downloaded[1]).all()


def test_the_weight_average_forgets_the_first_steps_and_decay_0_keeps_the_last_weights():
    model = train.Classifier(2, 4, [0.5] * 3, [0.25] * 3)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    averaged = train.Classifier(2, 4, [0.5] * 3, [0.25] * 3)
    averaged.load_state_dict(start)
    with torch.no_grad():
        model.head.bias.add_(1.0)

    train.update_average(averaged, model, 0.99, step=0)  # the first step's decay is 0.1, not 0.99
    assert torch.allclose(averaged.head.bias, start["head.bias"] + 0.9)
    train.update_average(averaged, model, 0.99, step=10_000)
    assert torch.allclose(averaged.head.bias, start["head.bias"] + 0.9 + 0.1 * 0.01)
    train.update_average(averaged, model, 0.0, step=10_000)
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in averaged.state_dict().items())
