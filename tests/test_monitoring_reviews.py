"""The reviewers' answers in the capture report: read from a folder and from S3 (moto), counted per model class
and kind, bad lines named; the report's Reviews section, its chart and the summary's `reviews` object."""

import base64
import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monitoring import baseline  # noqa: E402
from monitoring.__main__ import main as monitoring_main  # noqa: E402
from monitoring.reviews import read_reviews, summarise  # noqa: E402

# (model's class, reviewer's class): hand-written inputs, the counts below follow from them
TASKS = [
    ("bicycle", "bicycle"),
    ("bicycle", "bicycle"),
    ("bicycle", "motorcycle"),
    ("bicycle", "neither"),
    ("motorcycle", "motorcycle"),
    ("neither", "bicycle"),
]
CORRECTIONS = [("motorcycle", "bicycle"), ("motorcycle", "neither")]


def answer_line(execution: str, model_class: str, reviewer_class: str, kind: str, answered_at: str) -> str:
    return json.dumps(
        {
            "execution": execution,
            "s3_key": f"photos/{execution}.png",
            "model_class": model_class,
            "inferences": [0.6, 0.3],
            "class": reviewer_class,
            "reviewer": "ana@example.com",
            "answered_at": answered_at,
            "kind": kind,
        }
    )


def answer_files() -> dict[str, str]:
    """{path under reviews/: content}: the tasks answered on the 25th, the corrections on the 26th."""
    files = {}
    for index, (model_class, reviewer_class) in enumerate(TASKS):
        line = answer_line(f"task-{index}", model_class, reviewer_class, "task", f"2026-11-25T08:{index:02d}:00Z")
        files[f"2026/11/25/task-{index}.json"] = line + "\n" + ("\n" if index == 0 else "")  # a blank line: no answer
    for index, (model_class, reviewer_class) in enumerate(CORRECTIONS):
        line = answer_line(f"fix-{index}", model_class, reviewer_class, "correction", f"2026-11-26T09:0{index}:00Z")
        files[f"2026/11/26/fix-{index}.json"] = line + "\n"
    return files


BAD_FILES = {
    "2026/11/25/broken.json": '{"execution": "broken", \n',
    "2026/11/25/partial.json": json.dumps({"execution": "partial", "model_class": "bicycle"}) + "\n",
    "2026/11/25/odd-kind.json": answer_line("odd", "bicycle", "bicycle", "guess", "2026-11-25T08:00:00Z") + "\n",
    "2026/11/25/odd-time.json": answer_line("late", "bicycle", "bicycle", "task", "yesterday") + "\n",
    "2026/11/25/latin1.json": "caf\xe9",
}


def write_folder(folder: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("latin-1" if name.startswith("2026/11/25/latin1") else "utf-8"))
    return folder


def put_s3(s3, prefix: str, files: dict[str, str]) -> str:
    for name, content in files.items():
        body = content.encode("latin-1" if "latin1" in name else "utf-8")
        s3.put_object(Bucket="scones-data", Key=f"{prefix}{name}", Body=body)
    return f"s3://scones-data/{prefix}"


EXPECTED_ALL = {
    "bicycle": {"answers": 4, "overruled": 2, "reviewer_classes": {"bicycle": 2, "motorcycle": 1, "neither": 1}},
    "motorcycle": {"answers": 3, "overruled": 2, "reviewer_classes": {"bicycle": 1, "motorcycle": 1, "neither": 1}},
    "neither": {"answers": 1, "overruled": 1, "reviewer_classes": {"bicycle": 1, "motorcycle": 0, "neither": 0}},
}


def without_agreement(rows: dict) -> dict:
    return {name: {key: value for key, value in row.items() if key != "agreement"} for name, row in rows.items()}


# ------------------------------------------------------------------------------------------- counting


def test_answers_are_counted_per_model_class_and_kind(tmp_path):
    summary = summarise(read_reviews(str(write_folder(tmp_path, answer_files()))), ["bicycle", "motorcycle"])
    assert (summary["answers"], summary["overruled"], summary["files"]) == (8, 5, 8)
    assert summary["agreement"] == pytest.approx(3 / 8)
    assert summary["classes"] == ["bicycle", "motorcycle", "neither"]
    assert without_agreement(summary["model_classes"]) == EXPECTED_ALL
    assert summary["model_classes"]["bicycle"]["agreement"] == pytest.approx(0.5)
    tasks, corrections = summary["kinds"]["task"], summary["kinds"]["correction"]
    assert (tasks["answers"], tasks["overruled"], corrections["answers"], corrections["overruled"]) == (6, 3, 2, 2)
    assert corrections["agreement"] == 0
    assert without_agreement(corrections["model_classes"]) == {
        "motorcycle": {"answers": 2, "overruled": 2, "reviewer_classes": {"bicycle": 1, "motorcycle": 0, "neither": 1}}
    }
    assert (summary["first_answer"], summary["last_answer"]) == ("2026-11-25T08:00:00Z", "2026-11-26T09:01:00Z")
    assert summary["unreadable_lines"] == 0 and summary["failures"] == []


def test_answers_in_s3_count_as_in_a_folder(s3, tmp_path):
    from_s3 = summarise(read_reviews(put_s3(s3, "reviews/", answer_files())), ["bicycle", "motorcycle"])
    from_folder = summarise(read_reviews(str(write_folder(tmp_path, answer_files()))), ["bicycle", "motorcycle"])
    assert from_s3["source"] == "s3://scones-data/reviews/"
    assert {**from_s3, "source": ""} == {**from_folder, "source": ""}


def test_the_time_range_keeps_the_answers_given_in_it(tmp_path):
    folder = str(write_folder(tmp_path, answer_files()))
    since, until = datetime(2026, 11, 25, 8, 2, tzinfo=UTC), datetime(2026, 11, 26, 9, 1, tzinfo=UTC)
    kept = read_reviews(folder, since, until)
    assert sorted(answer.execution for answer in kept.answers) == ["fix-0", "task-2", "task-3", "task-4", "task-5"]
    assert read_reviews(folder, until=datetime(2026, 11, 25, tzinfo=UTC)).files == 0  # no day folder read


def test_bad_lines_are_counted_and_named_and_the_good_ones_kept(tmp_path):
    reviews = read_reviews(str(write_folder(tmp_path, {**answer_files(), **BAD_FILES})))
    assert len(reviews.answers) == 8
    failures = {Path(failure.file).name: (failure.line, failure.reason) for failure in reviews.failures}
    assert failures.keys() == {Path(name).name for name in BAD_FILES}
    assert failures["broken.json"][0] == 1 and failures["broken.json"][1].startswith("not JSON")
    assert failures["partial.json"] == (1, "missing or not a text: s3_key, class, answered_at, kind")
    assert failures["odd-kind.json"] == (1, "kind 'guess' is neither of task, correction")
    assert failures["odd-time.json"] == (1, "answered_at 'yesterday' is not an ISO time")
    assert failures["latin1.json"][0] == 0 and "UnicodeDecodeError" in failures["latin1.json"][1]


# --------------------------------------------------------------------------------------------- report

CLASSES = ["bicycle", "motorcycle"]


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def capture_record(time: str, answer: list[float]) -> str:
    return json.dumps(
        {
            "captureData": {
                "endpointInput": {
                    "observedContentType": "image/png",
                    "mode": "INPUT",
                    "data": base64.b64encode(png_bytes()).decode(),
                    "encoding": "BASE64",
                },
                "endpointOutput": {
                    "observedContentType": "application/json",
                    "mode": "OUTPUT",
                    "data": json.dumps(answer),
                    "encoding": "JSON",
                },
            },
            "eventMetadata": {"eventId": f"id-{time}", "inferenceTime": time},
            "eventVersion": "0",
        }
    )


@pytest.fixture
def report_inputs(tmp_path) -> tuple[Path, Path]:
    """A baseline of confident answers and an hour of like captures (the report needs both)."""
    answers = [[0.9, 0.1], [0.1, 0.9]] * 20
    images = tmp_path / "training"
    images.mkdir()
    for index in range(10):
        (images / f"{index}.png").write_bytes(png_bytes())
    settings = {"classes": CLASSES, "threshold": 0.8, "temperature": 1.0}
    statistics, constraints = baseline.statistics_of(
        np.array(answers), baseline.image_statistics(sorted(images.glob("*.png"))), settings
    )
    baseline.write(statistics, constraints, tmp_path / "baseline")
    hour = tmp_path / "captures" / "scones" / "AllTraffic" / "2026" / "11" / "25" / "08"
    hour.mkdir(parents=True)
    lines = [capture_record(f"2026-11-25T08:{index:02d}:00Z", answer) for index, answer in enumerate(answers)]
    (hour / "00-00-000-a.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "captures", tmp_path / "baseline"


def run_report(report_inputs, out: Path, *options: str) -> int:
    captures, baseline_dir = report_inputs
    arguments = ["report", str(captures), "--baseline", str(baseline_dir), "--out", str(out), "--no-progress"]
    return monitoring_main([*arguments, *options])


def test_report_shows_the_reviews_from_s3(s3, report_inputs, tmp_path, capsys):
    location = put_s3(s3, "reviews/", {**answer_files(), "2026/11/25/broken.json": "{not json\n"})
    assert run_report(report_inputs, tmp_path / "out", "--reviews", location) == 0
    assert "8 reviewed answer(s), 5 overruled the model, 1 unreadable line(s)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["reviews"]
    assert (summary["answers"], summary["overruled"], summary["unreadable_lines"]) == (8, 5, 1)
    assert without_agreement(summary["model_classes"]) == EXPECTED_ALL
    assert summary["failures"][0]["file"] == "s3://scones-data/reviews/2026/11/25/broken.json"
    page = (tmp_path / "out" / "report.html").read_text()
    section = page[page.index("<h2>Reviews</h2>") : page.index("<h2>Pictures</h2>")]
    assert "8 reviewed answers from 9 files under s3://scones-data/reviews/" in section
    assert "overruled the model 5\ntime(s), agreeing with it 37.5% of the time." in section
    assert "<tr><td>bicycle</td><td>4</td><td>2</td><td>50.0%</td><td>2</td><td>1</td><td>1</td></tr>" in section
    assert "<h3>corrections (2)</h3>" in section
    assert "s3://scones-data/reviews/2026/11/25/broken.json, line 1: not JSON" in section
    assert 'alt="reviews_by_model_class.png"' in section
    with Image.open(tmp_path / "out" / "reviews_by_model_class.png") as picture:
        assert picture.format == "PNG" and picture.width > 200


def test_report_without_reviews_says_none_yet(report_inputs, tmp_path):
    assert run_report(report_inputs, tmp_path / "plain") == 0
    assert "reviews" not in json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert "<h2>Reviews</h2><p>no reviewed answers yet.</p>" in (tmp_path / "plain" / "report.html").read_text()
    assert not (tmp_path / "plain" / "reviews_by_model_class.png").exists()

    (tmp_path / "reviews").mkdir()
    assert run_report(report_inputs, tmp_path / "empty", "--reviews", str(tmp_path / "reviews")) == 0
    summary = json.loads((tmp_path / "empty" / "summary.json").read_text())["reviews"]
    assert (summary["answers"], summary["files"], summary["agreement"], summary["model_classes"]) == (0, 0, None, {})
    page = (tmp_path / "empty" / "report.html").read_text()
    assert f"no reviewed answers yet under {tmp_path / 'reviews'}." in page
    assert not (tmp_path / "empty" / "reviews_by_model_class.png").exists()


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_a_reviews_location_that_does_not_exist_is_a_one_line_error(s3, report_inputs, tmp_path, capsys, where):
    location = str(tmp_path / "nowhere") if where == "folder" else "s3://no-such-bucket/reviews/"
    assert run_report(report_inputs, tmp_path / "out", "--reviews", location) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    expected = f"no reviews folder {location}" if where == "folder" else f"cannot list the reviews under {location}"
    assert error.startswith(f"monitoring: error: {expected}")
