"""`python -m local classify`: one's own photos through the local stack as `make run` brings it up (moto and the
endpoint server as background processes, the synthesized stacks deployed into them), with a model whose answer
follows the photo's colour: red a confident bicycle, blue a confident motorcycle, anything else unsure."""

import io
import json
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pytest
from conftest import assembly_directory, environment_restored
from PIL import Image

from local.__main__ import LocalRun, main, model_settings
from local.classify import answer_fields, filter_threshold, record_deployed
from stacks.config import DEFAULT_THRESHOLD, SconesConfig

pytestmark = pytest.mark.slow

COLOUR_MODEL = """
import io
import json

from PIL import Image

def model_fn(model_dir):
    return None

def input_fn(request_body, content_type):
    with Image.open(io.BytesIO(request_body)) as image:
        return image.convert("RGB").resize((1, 1)).getpixel((0, 0))

def predict_fn(rgb, model):
    red, green, blue = rgb
    if red > 150 and max(green, blue) < 100:
        return [0.97, 0.02]
    if blue > 150 and max(red, green) < 100:
        return [0.03, 0.95]
    return [0.55, 0.35]

def output_fn(prediction, accept):
    return json.dumps(prediction), "application/json"
"""
MODEL_JSON = {"classes": ["bicycle", "motorcycle"], "threshold": 0.9}
# metrics.json as the training writes it, with figures past the evaluation gate.
PASSING_METRICS = {"test": {"accuracy": 0.94, "at_threshold": {"accuracy": 0.967391312, "coverage": 0.92}}}
REAL_PHOTO = Path("/work/shared/data/real-photos-dev/motorcycle")


def model_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in (("code/inference.py", COLOUR_MODEL), ("model.json", json.dumps(MODEL_JSON))):
            member = tarfile.TarInfo(name)
            member.size = len(text.encode())
            archive.addfile(member, io.BytesIO(text.encode()))
    return buffer.getvalue()


def png(path: Path, colour, size: int = 32) -> Path:
    Image.new("RGB", (size, size), colour).save(path, "PNG")
    return path


def large_red_png(path: Path) -> Path:
    """A PNG of about 1 MB (noise does not compress), over the 180,000 bytes that travel inline: by reference."""
    rng = np.random.default_rng(0)
    pixels = np.stack(
        [rng.integers(200, 256, (600, 600)), rng.integers(0, 60, (600, 600)), rng.integers(0, 60, (600, 600))], -1
    )
    Image.fromarray(pixels.astype(np.uint8)).save(path, "PNG")
    assert 180_000 < path.stat().st_size < 6_291_456
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The local services up, as `up` leaves them (deployed.json written), with the colour model trained."""
    state_dir = tmp_path_factory.mktemp("state")
    with environment_restored():
        # The classic workflow (-c review=false): an uncertain photo fails; tests/test_local_review.py has review on.
        run = LocalRun(state_dir, assembly_directory(review="false"), "dev")
        info = run.start_aws()
        try:
            deployment = run.deploy([run.stack("Data")])
            bucket = deployment.created(run.stack("Data"), "AWS::S3::Bucket")["Data666C94C7"]["Ref"]
            # A model `up` trained on the same data earlier: `train` reuses it and uploads it.
            archive = state_dir / "model" / "model.tar.gz"
            archive.parent.mkdir()
            archive.write_bytes(model_archive())
            (state_dir / "model" / "trained-on.sha256").write_text("0" * 64)
            (state_dir / "model" / "metrics.json").write_text(json.dumps(PASSING_METRICS))
            model_url = run.train("0" * 64, bucket)
            run.register(model_url)  # past the evaluation gate, approved, recorded in SSM
            run.deploy([run.stack("Workflow"), run.stack("Endpoint")])
            endpoints = run.serve_endpoint(deployment, info["sagemaker_runtime"])
            record_deployed(run, bucket, endpoints, model_settings(archive), None)
            yield state_dir, bucket, model_url
        finally:
            run.endpoint.stop()
            run.aws.stop()


def classify(capsys, state_dir: Path, *arguments) -> tuple[int, str]:
    capsys.readouterr()
    status = main(["classify", *map(str, arguments), "--state-dir", str(state_dir)])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def classify_json(capsys, state_dir: Path, *arguments) -> dict:
    status, printed = classify(capsys, state_dir, *arguments, "--json")
    assert status == 0, printed
    return json.loads(printed)


def test_up_records_the_trained_models_threshold_beside_its_url(stack):
    state_dir, bucket, model_url = stack
    ssm = boto3.client("ssm")
    assert ssm.get_parameter(Name=SconesConfig(env_name="dev").model_parameter_name)["Parameter"]["Value"] == model_url
    assert ssm.get_parameter(Name=SconesConfig(env_name="dev").threshold_parameter_name)["Parameter"]["Value"] == "0.9"


def test_photos_are_classified_one_execution_each_with_class_probabilities_and_why_not(stack, tmp_path, capsys):
    state_dir, bucket, _ = stack
    red, blue, grey = (
        png(tmp_path / f"{name}.png", colour)
        for name, colour in (("red", (230, 20, 20)), ("blue", (20, 20, 230)), ("grey", (120, 120, 120)))
    )
    notes = tmp_path / "notes.png"
    notes.write_text("not a photo")
    document = classify_json(capsys, state_dir, red, blue, grey, notes)
    assert document["bucket"] == bucket and document["prefix"].startswith("photos/") and document["batch"] is None
    rows = {Path(row["photo"]).name: row for row in document["photos"]}
    assert [Path(row["photo"]).name for row in document["photos"]] == ["red.png", "blue.png", "grey.png", "notes.png"]

    assert rows["red.png"]["accepted"] and rows["red.png"]["class"] == "bicycle"
    assert rows["red.png"]["probabilities"] == {"bicycle": 0.97, "motorcycle": 0.02}
    assert rows["red.png"]["neither"] == pytest.approx(0.01)
    assert (rows["red.png"]["threshold"], rows["red.png"]["threshold_source"]) == (0.9, "model")
    assert rows["blue.png"]["accepted"] and rows["blue.png"]["class"] == "motorcycle"

    unsure = rows["grey.png"]
    assert not unsure["accepted"] and unsure["error"] == "ThresholdConfidenceNotMet"
    assert unsure["probabilities"] == {"bicycle": 0.55, "motorcycle": 0.35}  # what the filter refused
    assert unsure["reason"].startswith("THRESHOLD_CONFIDENCE_NOT_MET: ")
    assert "threshold 0.9 " in unsure["reason"]
    assert rows["notes.png"]["error"] == "NotAnImage" and "point s3_key at a PNG or JPEG" in rows["notes.png"]["reason"]
    assert all(0 < row["latency_ms"] < 30_000 for row in rows.values())
    uploaded = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=document["prefix"])["Contents"]
    assert sorted(item["Key"].rsplit("/", 1)[1] for item in uploaded) == [
        "blue.png",
        "grey.png",
        "notes.png",
        "red.png",
    ]


def test_the_text_output_names_each_photo_its_answer_and_the_reason(stack, tmp_path, capsys):
    state_dir, bucket, _ = stack
    red, grey = png(tmp_path / "red.png", (230, 20, 20)), png(tmp_path / "grey.png", (120, 120, 120))
    status, printed = classify(capsys, state_dir, red, grey)
    assert status == 0, printed
    lines = printed.splitlines()
    assert lines[0].startswith("red.png   bicycle     accepted (threshold 0.9, the model's)  ")
    assert lines[1].strip() == "bicycle 0.970  motorcycle 0.020  neither 0.010"
    assert lines[2].startswith("grey.png  bicycle     not accepted: ThresholdConfidenceNotMet  ")
    assert lines[3].strip() == "bicycle 0.550  motorcycle 0.350  neither 0.100"
    assert lines[4].strip().startswith("THRESHOLD_CONFIDENCE_NOT_MET: the top probability 0.55 (bicycle) is below")
    assert "\n2 photo(s): 1 accepted, 1 not (1 ThresholdConfidenceNotMet)\n" in printed
    assert f"uploaded to s3://{bucket}/photos/" in printed


def test_a_photo_too_large_to_travel_inline_is_classified_by_reference(stack, tmp_path, capsys):
    state_dir, _, _ = stack
    (row,) = classify_json(capsys, state_dir, large_red_png(tmp_path / "large.png"))["photos"]
    assert (row["accepted"], row["class"], row.get("reason")) == (True, "bicycle", None)


def test_a_real_phone_sized_photo_gets_an_answer(stack, capsys):
    photos = sorted(REAL_PHOTO.glob("*.jpg"), key=lambda path: path.stat().st_size) if REAL_PHOTO.is_dir() else []
    if not photos:
        pytest.skip(f"no real photos at {REAL_PHOTO} (the shared development data of this machine)")
    state_dir, _, _ = stack
    (row,) = classify_json(capsys, state_dir, photos[-1])["photos"]  # the largest: 2.7 MB
    assert row["bytes"] > 1_000_000
    assert row["probabilities"] == {"bicycle": 0.55, "motorcycle": 0.35}, row  # an answer: the colour model's unsure
    assert row["error"] == "ThresholdConfidenceNotMet"


def test_a_folder_is_classified_by_the_batch_and_its_result_files_summarised(stack, tmp_path, capsys):
    state_dir, bucket, _ = stack
    folder = tmp_path / "today"
    (folder / "more").mkdir(parents=True)
    png(folder / "red.png", (230, 20, 20))
    png(folder / "more" / "BLUE.PNG", (20, 20, 230))
    png(folder / "grey.jpg", (120, 120, 120))  # a PNG named .jpg: the endpoint reads what it is
    (folder / "notes.txt").write_text("not uploaded")
    document = classify_json(capsys, state_dir, folder)
    batch = document["batch"]
    assert batch["status"] == "SUCCEEDED", batch
    assert batch["manifest"].startswith(f"s3://{bucket}/batch_results/") and batch["manifest"].endswith(
        "/manifest.json"
    )
    assert batch["items"]["succeeded"] == 3
    rows = {row["s3_key"].removeprefix(document["prefix"]): row for row in document["photos"]}
    assert sorted(rows) == ["today/grey.jpg", "today/more/BLUE.png", "today/red.png"]
    assert (rows["today/red.png"]["accepted"], rows["today/red.png"]["class"]) == (True, "bicycle")
    assert (rows["today/more/BLUE.png"]["accepted"], rows["today/more/BLUE.png"]["class"]) == (True, "motorcycle")
    assert rows["today/red.png"]["probabilities"] == {"bicycle": 0.97, "motorcycle": 0.02}
    assert rows["today/grey.jpg"]["accepted"] is False
    assert rows["today/grey.jpg"]["error"] == "ThresholdConfidenceNotMet", rows["today/grey.jpg"]
    assert rows["today/grey.jpg"]["reason"].startswith("THRESHOLD_CONFIDENCE_NOT_MET: ")
    # from the history of the child execution that the result file names
    assert rows["today/grey.jpg"]["probabilities"] == {"bicycle": 0.55, "motorcycle": 0.35}

    status, printed = classify(capsys, state_dir, "--prefix", folder / "red.png", folder / "grey.jpg")
    assert status == 0, printed
    assert "\n2 photo(s): 1 accepted, 1 not (1 ThresholdConfidenceNotMet)\n" in printed
    assert "batch SUCCEEDED in " in printed and " ms; items: 2 SUCCEEDED\n" in printed
    assert f"result files: s3://{bucket}/batch_results/" in printed


def test_mistakes_are_named_before_anything_is_uploaded_or_started(stack, tmp_path, capsys):
    state_dir, _, _ = stack
    status, printed = classify(capsys, state_dir, tmp_path / "missing.jpg")
    assert (status, printed) == (
        2,
        f"local: error: {tmp_path / 'missing.jpg'} does not exist: pass PNG or JPEG files, or folders of them\n",
    )
    (tmp_path / "empty").mkdir()
    status, printed = classify(capsys, state_dir, tmp_path / "empty")
    assert (status, printed) == (
        2,
        f"local: error: {tmp_path / 'empty'} holds no .png, .jpg, .jpeg file: point at photos\n",
    )


def test_classify_with_nothing_up_and_no_cloud_assembly_says_to_synthesize(tmp_path, capsys):
    photo = png(tmp_path / "red.png", (230, 20, 20))
    status = main(["classify", str(photo), "--state-dir", str(tmp_path / "state"), "--assembly", str(tmp_path / "out")])
    assert status == 2
    assert capsys.readouterr().err == f"local: error: no cloud assembly at {tmp_path / 'out'}: run `make synth` first\n"


@pytest.mark.parametrize(
    ("context", "model", "expected"),
    [
        ({}, MODEL_JSON, {"value": 0.9, "source": "model"}),
        ({"threshold": "0.95"}, MODEL_JSON, {"value": 0.95, "source": "override"}),
        ({}, {"classes": ["bicycle", "motorcycle"]}, {"value": DEFAULT_THRESHOLD, "source": "default"}),
    ],
)
def test_the_threshold_named_is_the_one_the_synthesized_filter_applies(context, model, expected):
    workflow = json.loads((assembly_directory(**context) / "SconesDevWorkflow.template.json").read_text())
    assert filter_threshold(workflow, model) == expected


def test_an_answer_whose_most_likely_class_is_neither_is_named_so():
    """The flower of real-photos-dev as the photo model answered it: no bicycle or motorcycle, neither 0.964."""
    assert answer_fields([0.012, 0.024], ["bicycle", "motorcycle"]) == {
        "class": "neither",
        "probabilities": {"bicycle": 0.012, "motorcycle": 0.024},
        "neither": 0.964,
    }
    assert answer_fields([0.55, 0.35], ["bicycle", "motorcycle"])["class"] == "bicycle"
