"""training.fit and training/train.py: a short real fit, its artifacts, and the model served by its own handler."""

import base64
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training import calibration, etl, hyperparameters, photos, report, sourcedir, train  # noqa: E402
from training.data import load_split  # noqa: E402
from training.etl import SHARED_ARCHIVE as ARCHIVE  # noqa: E402
from training.fit import FitError, fit_local  # noqa: E402

pytestmark = pytest.mark.slow

CLASSES = ("bicycle", "motorcycle")
EXTRA_CLASS = "bus"  # staged after the targets: learnt alongside, never served
QUICK = {"architecture": "resnet9", "epochs": 1, "width": 8, "batch_size": 32}
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
    return {
        "archive": archive,
        "out": out,
        "model_dir": model_dir,
        "metrics": json.loads((out / "metrics.json").read_text()),
    }


def run_fit(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.fit", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_archive_holds_the_model_in_sagemaker_layout(fitted):
    assert fitted["archive"] == fitted["out"] / "model.tar.gz"
    with tarfile.open(fitted["archive"]) as tar:
        names = set(tar.getnames())
    assert {"model.pt", "model.json", "metrics.json", "code/inference.py"} <= names
    settings = json.loads((fitted["model_dir"] / "model.json").read_text())
    assert settings["classes"] == list(CLASSES)
    assert settings["threshold"] == fitted["metrics"]["threshold"]
    assert settings["temperature"] == fitted["metrics"]["temperature"]
    assert not list(fitted["out"].glob(".model*")), "temporary files left behind"


def test_metrics_record_curves_test_results_and_calibration(fitted):
    metrics = fitted["metrics"]
    assert json.loads((fitted["model_dir"] / "metrics.json").read_text()) == metrics
    assert len(metrics["history"]) == QUICK["epochs"]
    assert {"epoch", "lr", "train_loss", "train_accuracy", "validation_loss", "validation_accuracy"} <= set(
        metrics["history"][0]
    )
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
    pictures = [name for name in report.PICTURES if name != "real_photos"]  # a fit without --check-photos
    assert embedded == [(fitted["out"] / f"{name}.png").read_bytes() for name in pictures]
    accuracy = fitted["metrics"]["test"]["accuracy"]
    assert f"<th>test accuracy</th><td>{accuracy:.1%} of 100 images</td>" in page
    assert not list(fitted["out"].glob(".report*")), "temporary files left behind"


def test_the_model_code_is_only_what_serves(fitted):
    """code/ holds the handler and the network it loads; training, the report and matplotlib stay out."""
    with tarfile.open(fitted["archive"]) as tar:
        code = sorted(name for name in tar.getnames() if name.startswith("code/"))
    assert code == ["code/inference.py", "code/model.py"]
    for name in ("inference.py", "model.py"):
        assert (fitted["model_dir"] / "code" / name).read_bytes() == (ROOT / "training" / name).read_bytes()
    served = (
        "import json, sys; sys.path.insert(0, 'code'); import inference; "
        "model = inference.model_fn('.'); "
        "print(inference.output_fn(inference.predict_fn(inference.input_fn(open(sys.argv[1], 'rb').read(), "
        "'image/png'), model), 'application/json')[0]); "
        "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] in "
        "('matplotlib', 'training', 'train', 'report'))), flush=True); "
        # torch's thread pools have been seen to abort the interpreter's normal exit here ("terminate called
        # without an active exception"), once in many runs; the serving container never exits so.
        "import os; os._exit(0)"
    )
    image = fitted["out"] / "training_curves.png"  # any PNG
    finished = subprocess.run(
        [sys.executable, "-c", served, str(image)],
        cwd=fitted["model_dir"],
        env={**os.environ, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 0, finished.stderr
    answer, imported = finished.stdout.splitlines()
    assert len(json.loads(answer)) == 2
    assert json.loads(imported) == []


def load_handler(model_dir: Path):
    """code/inference.py imported as the serving container imports it: code/ on the path, beside model.py."""
    code = str(model_dir / "code")
    sys.path.insert(0, code)
    sys.modules.pop("model", None)
    try:
        spec = importlib.util.spec_from_file_location("served_inference", model_dir / "code" / "inference.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(code)
        sys.modules.pop("model", None)
    return module


def test_served_model_answers_what_training_evaluated(fitted, data_dir):
    handler = load_handler(fitted["model_dir"])
    model = handler.model_fn(str(fitted["model_dir"]))
    for expected in fitted["metrics"]["test"]["predictions"]:
        body, content_type = handler.output_fn(
            handler.predict_fn(handler.input_fn((data_dir / expected["image"]).read_bytes(), "image/png"), model),
            "application/json",
        )
        assert content_type == "application/json"
        assert json.loads(body) == pytest.approx(expected["probabilities"], abs=1e-5)


def test_handler_takes_any_image_size_and_mode_and_refuses_what_it_cannot_read(fitted):
    handler = load_handler(fitted["model_dir"])
    model = handler.model_fn(fitted["model_dir"])
    jpeg = io.BytesIO()
    Image.new("L", (100, 60), 128).save(jpeg, format="JPEG")
    for body, content_type in ((jpeg.getvalue(), "image/jpeg"), (jpeg.getvalue(), "application/x-image")):
        probabilities = json.loads(
            handler.output_fn(handler.predict_fn(handler.input_fn(body, content_type), model), "application/json")[0]
        )
        assert len(probabilities) == 2 and sum(probabilities) == pytest.approx(1)
    with pytest.raises(ValueError, match="unsupported content type 'text/csv'"):
        handler.input_fn(b"1,2,3", "text/csv")
    with pytest.raises(ValueError, match="not a decodable image"):
        handler.input_fn(b"not an image", "image/png")


def test_fit_is_deterministic_for_a_seed(fitted, data_dir, tmp_path):
    fit_local(data_dir, tmp_path, **QUICK)
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again["test"]["predictions"] == fitted["metrics"]["test"]["predictions"]


def reviewed_photos(folder: Path) -> Path:
    """A labels/ folder as the review page writes it: photos per class, a bad file, a folder that is no class,
    and the marker the training state machine keeps."""
    for index, (name, size) in enumerate([("bicycle", (40, 30)), ("motorcycle", (30, 50)), ("neither", (64, 64))] * 4):
        (folder / name).mkdir(parents=True, exist_ok=True)
        colour = (index * 20 % 256, index * 50 % 256, index * 90 % 256)
        Image.new("RGB", size, colour).save(folder / name / f"photo-{index}.jpg", format="JPEG")
    (folder / "bicycle" / "notes.txt").write_text("not a photo")
    (folder / "car").mkdir()
    Image.new("RGB", (20, 20)).save(folder / "car" / "a.png")
    (folder / photos.MARKER).write_text("the training state machine's marker")
    return folder


def test_reviewed_photos_are_learnt_split_as_the_etl_stages_them_and_bad_files_are_listed(data_dir, tmp_path):
    labels = reviewed_photos(tmp_path / "labels")
    finished = run_fit(
        "--local", "--data", str(data_dir), "--labels", str(labels), "--out", str(tmp_path / "out"), *quick_arguments()
    )
    assert finished.returncode == 0, finished.stderr
    learnt = json.loads((tmp_path / "out" / "metrics.json").read_text())["labels"]

    staged = etl.stage(ARCHIVE, tmp_path / "staged", CLASSES + (EXTRA_CLASS,), photos=labels, progress=False)
    assert learnt["counts"] == staged.dataset["photos"]["counts"]
    assert learnt["staged"] == staged.dataset["photos"]["staged"]
    assert sum(sum(split.values()) for split in learnt["counts"].values()) == 12
    assert sorted(skipped["path"] for skipped in learnt["skipped"]) == ["bicycle/notes.txt", "car/a.png"]
    assert "skipped reviewed photo car/a.png: folder 'car' is no class" in finished.stderr
    fit_local(data_dir, tmp_path / "without", **QUICK)
    untouched = json.loads((tmp_path / "without" / "metrics.json").read_text())
    assert learnt["staged_already"] == 0
    assert "labels" not in untouched
    trained = json.loads((tmp_path / "out" / "metrics.json").read_text())["train_images"]
    assert trained == untouched["train_images"] + sum(learnt["counts"]["train"].values()) + sum(
        count for name, count in learnt["counts"]["validation"].items() if name == "neither"
    )

    finished = run_fit(
        "--local", "--data", str(tmp_path / "staged"), "--labels", str(labels), "--out", str(tmp_path / "again"),
        *quick_arguments(),
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["labels"]["staged_already"] == 12 and again["train_images"] == trained


def test_labels_that_are_not_a_folder_are_refused(data_dir, tmp_path):
    finished = run_fit(
        "--local", "--data", str(data_dir), "--labels", "README.md", "--out", str(tmp_path), *quick_arguments()
    )
    assert finished.returncode == 2
    assert finished.stderr == (
        "fit: error: --labels README.md is not a folder: pass a folder with a subfolder of photos per class\n"
    )
    finished = run_fit("--sagemaker", "--labels", str(tmp_path))
    assert finished.returncode == 2 and "--labels and --check-photos are for --local" in finished.stderr


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--epochs", "0"], "argument --epochs: 0 is outside the valid range [1, 1000]"),
        (["--epochs", "many"], "argument --epochs: 'many' is not an int or auto; valid range [1, 1000]"),
        (["--learning_rate", "fast"], "argument --learning_rate: 'fast' is not a float; valid range [1e-06, 10.0]"),
        (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["--bfloat16", "yes"], "argument --bfloat16: 'yes' is not one of auto, 1, 0"),
    ],
)
def test_bad_hyperparameters_give_one_line_errors(data_dir, tmp_path, arguments, message):
    finished = run_fit("--local", "--data", str(data_dir), "--out", str(tmp_path), *arguments)
    assert finished.returncode == 2
    assert finished.stderr == f"fit: error: {message}\n"
    with pytest.raises(FitError, match="outside the valid range"):
        fit_local(data_dir, tmp_path, epochs=0)


def test_missing_data_gives_one_line_errors(tmp_path):
    finished = run_fit("--local", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert finished.returncode == 2
    assert (
        finished.stderr == f"fit: error: data folder {tmp_path / 'nowhere'} does not exist "
        "(stage it with `python -m training.etl`)\n"
    )
    (tmp_path / "train.lst").write_text("")
    finished = run_fit("--local", "--data", str(tmp_path), "--out", str(tmp_path / "out"))
    assert finished.returncode == 2
    assert (
        finished.stderr == f"fit: error: data folder {tmp_path} has no validation.lst "
        "(stage it with `python -m training.etl`)\n"
    )


def test_data_that_is_a_file_is_named_a_file_not_missing(tmp_path):
    finished = run_fit("--local", "--data", "README.md", "--out", str(tmp_path))
    assert finished.returncode == 2
    assert (
        finished.stderr == "fit: error: data folder README.md is a file, not a folder: pass the folder "
        "`python -m training.etl --out DIR` staged\n"
    )


def without_root_privileges(command: list[str]) -> list[str]:
    """The command run without the capability to write where permissions forbid it, when the tests run as root."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]


@pytest.mark.parametrize("where", ["folder", "subfolder"])
def test_a_read_only_out_folder_gives_one_line_and_writes_nothing(data_dir, tmp_path, where):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    out = read_only if where == "folder" else read_only / "models"
    try:
        finished = subprocess.run(
            without_root_privileges(
                [
                    sys.executable,
                    "-m",
                    "training.fit",
                    "--local",
                    "--data",
                    str(data_dir),
                    "--out",
                    str(out),
                    "--epochs",
                    "1",
                ]
            ),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        read_only.chmod(0o755)
    assert finished.returncode == 2
    assert (
        finished.stderr == f"fit: error: cannot write to {out} (Permission denied): choose another --out "
        "folder or make this one writable\n"
    )
    assert list(read_only.iterdir()) == []


def test_an_out_that_is_a_file_is_refused(data_dir, tmp_path):
    (tmp_path / "model").write_text("not a folder")
    finished = run_fit("--local", "--data", str(data_dir), "--out", str(tmp_path / "model"))
    assert finished.returncode == 2
    assert (
        finished.stderr == f"fit: error: --out {tmp_path / 'model'} is a file, not a folder: choose a folder "
        "for the model and its report\n"
    )


def copy_of_the_data(data_dir: Path, destination: Path) -> Path:
    shutil.copytree(data_dir, destination, symlinks=True)
    return destination


def test_bad_data_files_give_one_line_errors_from_the_training_script(data_dir, tmp_path):
    data = copy_of_the_data(data_dir, tmp_path / "data")
    first_image = (data / "validation.lst").read_text().splitlines()[0].split("\t")[-1]
    (data / first_image).unlink()
    (data / first_image).write_bytes(b"not a png")
    finished = run_fit("--local", "--data", str(data), "--out", str(tmp_path / "out"), *quick_arguments())
    assert finished.returncode == 1
    assert "Traceback" not in finished.stderr
    assert finished.stderr.splitlines()[-2:] == [
        f"train.py: error: {data / first_image} (listed in {data / 'validation.lst'}) is not a readable image: "
        f"cannot identify image file '{data / first_image}'",
        "fit: error: train.py failed (exit status 1)",
    ]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == []

    for content, message in (
        ("0\tbicycle\ttrain/x.png\n", f"{data / 'validation.lst'}:1: label 'bicycle' is not a number 0 or above"),
        ("0\t-1\ttrain/x.png\n", f"{data / 'validation.lst'}:1: label '-1' is not a number 0 or above"),
        ("\x89PNG\r\n\x1a\n\xff\xfe", f"{data / 'validation.lst'} is not a text manifest"),
        (
            "",
            f"{data / 'validation.lst'} lists no images of the target classes, on which the temperature and "
            "threshold are fitted",
        ),
    ):
        (data / "validation.lst").write_bytes(content.encode("latin-1"))
        finished = run_fit("--local", "--data", str(data), "--out", str(tmp_path / "out"), *quick_arguments())
        assert finished.returncode == 1
        assert "Traceback" not in finished.stderr
        assert finished.stderr.splitlines()[-2] == f"train.py: error: {message}"

    shutil.copyfile(data_dir / "validation.lst", data / "validation.lst")
    (data / first_image).write_bytes((data_dir / first_image).read_bytes())
    (data / "dataset.json").write_text("[1, 2")
    finished = run_fit("--local", "--data", str(data), "--out", str(tmp_path / "out"), *quick_arguments())
    assert finished.returncode == 1
    assert "Traceback" not in finished.stderr
    assert (
        finished.stderr.splitlines()[-2]
        == f"train.py: error: {data / 'dataset.json'} is not the JSON object `python -m training.etl` writes"
    )


def test_a_test_manifest_without_target_images_means_no_test_metrics(data_dir, tmp_path):
    data = copy_of_the_data(data_dir, tmp_path / "data")
    (data / "test.lst").write_text("")
    finished = run_fit("--local", "--data", str(data), "--out", str(tmp_path / "out"), *quick_arguments())
    assert finished.returncode == 0, finished.stderr
    assert f"{data / 'test.lst'} lists no images of the target classes: no test metrics\n" in finished.stderr
    assert "test" not in json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "metrics.json",
        "model.tar.gz",
        "report.html",
        "training_curves.png",
    ]


def quick_arguments() -> list[str]:
    return [f"--{name}={value}" for name, value in QUICK.items()]


def test_an_interrupted_fit_exits_130_in_one_line_and_writes_nothing(data_dir, tmp_path):
    """Ctrl-C reaches the terminal's whole process group: fit and the training script it runs."""
    out = tmp_path / "out"
    fit = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training.fit",
            "--local",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--architecture",
            "resnet9",
            "--epochs",
            "50",
            "--width",
            "8",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # As a terminal starts it: a shell's background job (a CI runner's, say) inherits SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        lines = []
        for line in fit.stderr:
            lines.append(line)
            if line.startswith("epoch "):
                break
        os.killpg(fit.pid, signal.SIGINT)
        rest = fit.stderr.read()
        assert fit.wait(timeout=60) == 130
    finally:
        fit.kill()
    assert "Traceback" not in rest
    assert rest.splitlines()[-1] == f"fit: interrupted; nothing was written to {out}"
    assert list(out.iterdir()) == []


def test_the_source_directory_packs_the_same_bytes_each_time(tmp_path):
    first, second = sourcedir.pack(tmp_path / "a.tar.gz"), sourcedir.pack(tmp_path / "b.tar.gz")
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        assert tar.getnames() == list(sourcedir.FILES)
        assert all(tar.extractfile(name).read() == (ROOT / "training" / name).read_bytes() for name in tar.getnames())


def test_a_folder_to_check_without_bicycle_and_motorcycle_photos_fails_before_training(data_dir, tmp_path):
    (tmp_path / "photos" / "bicycle").mkdir(parents=True)
    out = tmp_path / "out"
    finished = run_fit(
        "--local", "--data", str(data_dir), "--out", str(out), "--check-photos", str(tmp_path / "photos")
    )
    assert finished.returncode == 2
    assert finished.stderr == (
        f"fit: error: --check-photos: {tmp_path / 'photos'} has no bicycle/ and motorcycle/ folders of photos\n"
    )
    assert not out.exists()


def test_help_lists_the_hyperparameters():
    finished = run_fit("--help")
    assert finished.returncode == 0
    assert all(f"--{name}" in finished.stdout for name in hyperparameters.HYPERPARAMETERS)


def test_threshold_is_the_lowest_confidence_keeping_the_target_accuracy():
    probabilities = torch.tensor([[0.95, 0.05], [0.1, 0.9], [0.2, 0.8], [0.7, 0.3]])
    labels = torch.tensor([0, 1, 0, 0])  # the 0.8-confident answer is wrong
    assert calibration.choose_threshold(probabilities, labels, 0.99) == pytest.approx(0.9)
    assert calibration.choose_threshold(probabilities, labels, 0.75) == pytest.approx(0.7)
    assert calibration.selective(probabilities, labels, 0.9) == {"threshold": 0.9, "coverage": 0.5, "accuracy": 1.0}


def test_with_neither_the_threshold_keeps_both_the_target_accuracy_and_the_neither_share():
    """Neither images are not counted among the accepted answers: how many the calibration set holds must not move
    the threshold, only the share of them it accepts."""
    targets = torch.tensor([[0.95, 0.05], [0.1, 0.9], [0.2, 0.8], [0.7, 0.3]])
    target_labels = torch.tensor([0, 1, 0, 0])  # as above: 0.9 keeps 99% of accepted targets right
    neither = torch.tensor([[0.97, 0.01]] + [[0.3, 0.2]] * 98 + [[0.85, 0.1]])  # one of 100 at 0.97, one at 0.85
    probabilities, labels = torch.cat([targets, neither]), torch.cat([target_labels, torch.full((100,), 2)])

    chosen = calibration.choose_threshold_with_neither(probabilities, labels, 0.99, 0.01)
    assert chosen["threshold"] == chosen["for_targets"] == pytest.approx(0.9)
    # 1% of the neither images may pass: the bound is just above the second most confident one.
    neither_confidence = neither.max(1).values
    assert (neither_confidence >= chosen["for_neither"]).sum() == 1 and chosen["for_neither"] < 0.8500001
    # Ten times as many neither images, the same share of them confident: the same threshold.
    tenfold = torch.cat([targets] + [neither] * 10), torch.cat([target_labels, torch.full((1000,), 2)])
    assert calibration.choose_threshold_with_neither(*tenfold, 0.99, 0.01) == chosen
    # Counted among the accepted answers instead, the ten 0.97 ones would leave no threshold but 1: accept nothing.
    assert calibration.choose_threshold(*tenfold, 0.99) == 1.0

    # No neither image may pass: the bound is above the 0.97 one, where no target answer is left to accept.
    strict = calibration.choose_threshold_with_neither(probabilities, labels, 0.99, 0.0)
    assert not (neither_confidence >= strict["for_neither"]).any() and strict["threshold"] == 1.0


def test_where_the_neither_bound_decides_the_target_accuracy_is_checked_again():
    """Accuracy does not always rise with the threshold: at the neither bound the accepted targets may be right less
    often than at the targets' own threshold."""
    probabilities = torch.tensor([[0.99, 0.01], [0.03, 0.97], [0.9, 0.1], [0.9, 0.1], [0.95, 0.02]])
    labels = torch.tensor([0, 0, 0, 0, 2])  # the 0.97 answer is wrong; the last image is neither
    chosen = calibration.choose_threshold_with_neither(probabilities, labels, 0.75, 0.0)
    assert chosen["for_targets"] == pytest.approx(0.9)  # 3 of 4 right
    assert 0.95 < chosen["for_neither"] < 0.9500001
    assert chosen["threshold"] == pytest.approx(0.99)  # at the neither bound 1 of the 2 accepted answers is wrong


def test_temperature_minimises_validation_loss():
    logits = torch.tensor([[4.0, -4.0], [3.0, -3.0], [-2.0, 2.0], [2.0, -2.0]])
    labels = torch.tensor([0, 0, 1, 1])
    temperature = calibration.fit_temperature(logits, labels)
    loss = lambda t: torch.nn.functional.cross_entropy(logits / t, labels).item()  # noqa: E731
    assert loss(temperature) <= min(loss(temperature * 0.9), loss(temperature * 1.1), loss(1.0))


def test_temperature_is_left_at_1_when_every_validation_answer_is_right():
    """Else the loss keeps falling as the temperature does, and the served probabilities would all be near 1."""
    logits = torch.tensor([[4.0, -4.0], [3.0, -3.0], [-2.0, 2.0], [0.5, -0.5]])
    assert calibration.fit_temperature(logits, torch.tensor([0, 0, 1, 0])) == 1.0


def test_images_are_found_where_sagemaker_puts_them(data_dir):
    """On SageMaker the `train` channel may hold `x.png` where the manifest says `train/x.png`."""
    as_staged = load_split(data_dir, data_dir / "validation.lst")
    as_downloaded = load_split(data_dir / "train", data_dir / "validation.lst")
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


def test_the_training_script_says_in_one_line_when_it_cannot_create_its_model_folder(data_dir, tmp_path):
    """Run as SageMaker runs it, from a copy of the source directory; checked before training, not after."""
    script = sourcedir.copy(tmp_path / "code")
    (tmp_path / "file").write_text("")
    env = {
        **os.environ,
        "SM_MODEL_DIR": str(tmp_path / "file" / "model"),
        "SM_OUTPUT_DATA_DIR": str(tmp_path / "out"),
        **{
            f"SM_CHANNEL_{name.upper()}": str(data_dir)
            for name in ("train", "train_lst", "validation", "validation_lst")
        },
    }
    finished = subprocess.run(
        [sys.executable, script.name, *quick_arguments()],
        cwd=script.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 1
    assert (
        finished.stderr.splitlines()[-1] == f"train.py: error: cannot create {tmp_path / 'file' / 'model'}: "
        "Not a directory"
    )
    assert "epoch" not in finished.stderr
