"""The capture report: the reader on hand-written SageMaker records, and the checks on captures of the real
local endpoint serving a freshly trained model (quiet on its own test images, loud on drifted ones)."""

import base64
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from local import aws  # noqa: E402
from local.endpoint import CaptureSpec, EndpointServer, EndpointSpec  # noqa: E402
from monitoring import checks  # noqa: E402
from monitoring.__main__ import last_period, main as monitoring_main  # noqa: E402
from monitoring.captures import list_capture_files, read_captures  # noqa: E402
from training import etl  # noqa: E402
from training.etl import SHARED_ARCHIVE as ARCHIVE  # noqa: E402
from training.fit import fit_local  # noqa: E402

pytestmark = pytest.mark.slow

CLASSES = ("bicycle", "motorcycle")
OTHER_CLASSES = ("tank", "tractor", "rocket")
QUICK = {
    "architecture": "resnet9",
    "epochs": 2,
    "width": 8,
    "batch_size": 32,
}  # about 20 s here; validation accuracy about 0.8
BUCKET = "scones-monitoring-tests"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IMAGE_MEANS = {f"image_mean_{channel}" for channel in ("red", "green", "blue")}
IMAGE_STDS = {f"image_std_{channel}" for channel in ("red", "green", "blue")}
BORDER = "image_border_minus_centre"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    etl.stage(ARCHIVE, out, CLASSES, progress=False)
    return out


@pytest.fixture(scope="module")
def other_vehicles(tmp_path_factory):
    out = tmp_path_factory.mktemp("other")
    etl.stage(ARCHIVE, out, OTHER_CLASSES, progress=False)
    return out


@pytest.fixture(scope="module")
def model(staged, tmp_path_factory):
    return fit_local(staged, tmp_path_factory.mktemp("fit"), **QUICK)


@pytest.fixture(scope="module")
def baseline_dir(model, staged, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    assert monitoring_main(["baseline", "--model", str(model), "--data", str(staged), "--out", str(out)]) == 0
    return out


def staged_test_images(staged: Path) -> list[bytes]:
    return [(staged / line.split("\t")[2]).read_bytes() for line in (staged / "test.lst").read_text().splitlines()]


def altered(pngs: list[bytes], change) -> list[bytes]:
    """The images with `change` applied to their float RGB pixels (0..255), as PNG."""
    results = []
    for png in pngs:
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(change(pixels), 0, 255).astype(np.uint8)).save(buffer, "PNG")
        results.append(buffer.getvalue())
    return results


@pytest.fixture(scope="module")
def captured(model, staged, other_vehicles):
    """Captures in moto's S3 of one endpoint per kind of traffic; answers {kind: s3 prefix}."""
    saved = dict(os.environ)
    server, url = aws.start()
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        noise = np.random.default_rng(0)
        traffic = {
            "clean": staged_test_images(staged),
            "dark": altered(staged_test_images(staged), lambda pixels: pixels * 0.5),
            "noisy": altered(staged_test_images(staged), lambda pixels: pixels + noise.normal(0, 25, pixels.shape)),
            "inverted": altered(staged_test_images(staged), lambda pixels: 255 - pixels),
        }
        for label, name in enumerate(OTHER_CLASSES):
            traffic[name] = [
                (other_vehicles / line.split("\t")[2]).read_bytes()
                for line in (other_vehicles / "test.lst").read_text().splitlines()
                if line.split("\t")[1] == str(label)
            ]
        capture = CaptureSpec(destination=f"s3://{BUCKET}/data_capture")
        specs = [EndpointSpec(f"scones-{kind}", model_data=model, capture=capture) for kind in traffic]
        with EndpointServer(specs) as endpoints:
            runtime = boto3.client("sagemaker-runtime", endpoint_url=endpoints.url)

            def invoke(request):
                kind, body = request
                runtime.invoke_endpoint(EndpointName=f"scones-{kind}", Body=body, ContentType="image/png")

            requests = [(kind, body) for kind, bodies in traffic.items() for body in bodies]
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(invoke, requests))
        yield {kind: f"s3://{BUCKET}/data_capture/scones-{kind}/" for kind in traffic}
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)


def report(prefix: str, baseline_dir: Path, out: Path, *options: str) -> dict:
    assert (
        monitoring_main(
            ["report", prefix, "--baseline", str(baseline_dir), "--out", str(out), "--no-progress", *options]
        )
        == 0
    )
    return json.loads((out / "summary.json").read_text())


def violated(summary: dict) -> set[str]:
    return {row["feature_name"] for row in summary["checks"] if row["status"] == "VIOLATION"}


# ---------------------------------------------------------------------------- baseline and endpoint traffic


def test_baseline_follows_model_monitor_shapes(baseline_dir):
    statistics = json.loads((baseline_dir / "statistics.json").read_text())
    constraints = json.loads((baseline_dir / "constraints.json").read_text())
    assert statistics["dataset"] == {"item_count": 100, "image_count": 900}
    names = [feature["name"] for feature in statistics["features"]]
    assert names == [
        "prediction",
        "top_probability",
        "low_confidence",
        "neither",
        "neither_probability",
        *sorted(IMAGE_MEANS, key=names.index),
        *sorted(IMAGE_STDS, key=names.index),
        BORDER,
        "image_size",
        "image_format",
    ]
    border = checks.feature(statistics, BORDER)["numerical_statistics"]
    # Photos of vehicles: the border (sky, road, backdrop) is mostly lighter than the middle.
    assert border["common"]["num_present"] == 900 and 0.05 < border["mean"] < 0.2
    top = checks.feature(statistics, "top_probability")["numerical_statistics"]
    assert top["common"]["num_present"] == 100 and 0.5 <= top["min"] <= top["mean"] <= top["max"] <= 1
    assert sum(bucket["count"] for bucket in top["distribution"]["kll"]["buckets"]) == 100
    assert checks.category_counts(statistics, "image_format") == {"PNG/RGB": 900}
    assert checks.feature(statistics, "neither")["inferred_type"] == "Integral"
    neither = checks.feature(statistics, "neither")["numerical_statistics"]
    assert neither["common"]["num_present"] == 100
    # This tiny model is a classic one (its answers sum to 1): it never says neither.
    assert neither["mean"] == checks.feature(statistics, "neither_probability")["numerical_statistics"]["max"] == 0
    assert sum(checks.category_counts(statistics, "prediction").values()) == 100
    domains = {
        feature["name"]: feature.get("string_constraints", {}).get("domains") for feature in constraints["features"]
    }
    assert domains["image_size"] == ["32x32"] and domains["prediction"] == list(CLASSES)
    assert constraints["model"]["classes"] == list(CLASSES)
    assert constraints["monitoring_config"]["thresholds"] == checks.DEFAULT_THRESHOLDS


def test_in_distribution_traffic_gives_no_violation(captured, baseline_dir, tmp_path):
    summary = report(captured["clean"], baseline_dir, tmp_path)
    assert summary["records"] == 100 and summary["unreadable_records"] == 0
    assert violated(summary) == set(), summary["checks"]
    statuses = {row["feature_name"]: row["status"] for row in summary["checks"]}
    assert statuses["top_probability"] == statuses["image_mean_red"] == statuses["prediction"] == "OK"
    assert statuses[BORDER] == "OK"
    assert json.loads((tmp_path / "constraint_violations.json").read_text()) == {"violations": []}


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("dark", IMAGE_MEANS | IMAGE_STDS),
        ("noisy", IMAGE_STDS),
        ("inverted", {BORDER}),
        ("tank", {"image_std_green", "image_std_blue"}),
        ("rocket", {"image_mean_blue"}),
    ],
)
def test_drifted_traffic_names_what_moved(captured, baseline_dir, tmp_path, kind, expected):
    summary = report(captured[kind], baseline_dir, tmp_path)
    assert expected <= violated(summary), summary["checks"]
    violations = json.loads((tmp_path / "constraint_violations.json").read_text())["violations"]
    assert {violation["feature_name"] for violation in violations} == violated(summary)
    for violation in violations:
        assert set(violation) == {"feature_name", "constraint_check_type", "description", "window"}
        assert re.search(r"p=[0-9.e-]+", violation["description"])


def test_inverted_images_are_named_by_their_border_and_centre(captured, baseline_dir, tmp_path):
    summary = report(captured["inverted"], baseline_dir, tmp_path)
    (row,) = [row for row in summary["checks"] if row["feature_name"] == BORDER]
    assert row["status"] == "VIOLATION"
    shares = re.search(r"border brighter than the centre in (\d+)% of images \(baseline (\d+)%\)", row["description"])
    assert shares and int(shares[1]) < 50 < int(shares[2]), row["description"]
    # The channel means of inverted CIFAR images barely move: the new statistic is what catches inversion.
    assert not violated(summary) & IMAGE_MEANS, summary["checks"]


def test_a_baseline_without_the_border_feature_skips_that_check_only(captured, baseline_dir, tmp_path):
    old = tmp_path / "old-baseline"
    old.mkdir()
    statistics = json.loads((baseline_dir / "statistics.json").read_text())
    statistics["features"] = [entry for entry in statistics["features"] if entry["name"] != BORDER]
    (old / "statistics.json").write_text(json.dumps(statistics))
    shutil.copy(baseline_dir / "constraints.json", old / "constraints.json")
    summary = report(captured["inverted"], old, tmp_path / "out")
    rows = {row["feature_name"]: row for row in summary["checks"]}
    assert rows[BORDER]["status"] == "SKIPPED" and "rebuild it" in rows[BORDER]["description"]
    assert rows["image_mean_red"]["status"] != "SKIPPED"


def test_other_vehicles_move_the_answers_or_the_images(captured, baseline_dir, tmp_path):
    summary = report(captured["tractor"], baseline_dir, tmp_path)
    assert violated(summary) & {"top_probability", "low_confidence", "prediction", *IMAGE_MEANS, *IMAGE_STDS}


# ------------------------------------------------------------------ metrics, as the hourly drift job publishes them


def published(endpoint_name: str) -> dict[tuple, tuple[float, float]]:
    """What moto's CloudWatch holds for the endpoint: {(metric, check type or None): (maximum, sample count)}.

    Each series is read with its exact dimensions. moto matches dimensions as a subset (CloudWatch matches them
    exactly), so the total's sample count also counts the per-check-type points; its maximum is still the total.
    """
    cloudwatch = boto3.client("cloudwatch")
    now = datetime.now(UTC)
    found = {}
    for series in cloudwatch.list_metrics(
        Namespace="Scones", Dimensions=[{"Name": "EndpointName", "Value": endpoint_name}]
    )["Metrics"]:
        points = cloudwatch.get_metric_statistics(
            Namespace="Scones",
            MetricName=series["MetricName"],
            Dimensions=series["Dimensions"],
            StartTime=now - timedelta(hours=1),
            EndTime=now + timedelta(minutes=5),
            Period=3600,
            Statistics=["Maximum", "SampleCount"],
        )["Datapoints"]
        check_type = next((d["Value"] for d in series["Dimensions"] if d["Name"] == "CheckType"), None)
        found[series["MetricName"], check_type] = (
            max(p["Maximum"] for p in points),
            sum(p["SampleCount"] for p in points),
        )
    return found


@pytest.mark.parametrize("kind", ["dark", "clean"])
def test_report_publishes_its_violations_to_cloudwatch(captured, baseline_dir, tmp_path, kind):
    summary = report(
        captured[kind],
        baseline_dir,
        tmp_path,
        "--publish-metrics",
        "Scones",
        "--endpoint-name",
        f"scones-{kind}-published",
    )
    metrics = published(f"scones-{kind}-published")
    by_type = {
        check_type: sum(
            1
            for result in summary["results"]
            if result["status"] == "VIOLATION" and result["constraint_check_type"] == check_type
        )
        for check_type in ("baseline_drift_check", "data_type_check", "categorical_values_check", "parse_failure_check")
    }
    assert metrics == {
        ("DriftViolations", None): (summary["violations"], 5),
        **{("DriftViolations", check_type): (count, 1) for check_type, count in by_type.items()},
        ("DriftCheckedRecords", None): (100, 1),
        ("NeitherShare", None): (100 * summary["neither_share"], 1),
    }
    assert (summary["violations"] > 0) == (kind == "dark"), summary["checks"]


def test_a_quiet_hour_publishes_zeros_only_when_allowed(captured, baseline_dir, tmp_path):
    quiet = [
        captured["clean"],
        "--baseline",
        str(baseline_dir),
        "--no-progress",
        "--last",
        "1h",
        "--until",
        "2020-01-01T10:10:00Z",
        "--publish-metrics",
        "Scones",
        "--endpoint-name",
        "scones-quiet",
    ]
    finished = subprocess.run(
        [sys.executable, "-m", "monitoring", "report", *quiet, "--out", str(tmp_path / "a")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 2 and "no capture files" in finished.stderr and "time range" in finished.stderr
    assert published("scones-quiet") == {}
    assert monitoring_main(["report", *quiet, "--out", str(tmp_path / "b"), "--allow-empty"]) == 0
    assert published("scones-quiet") == {
        ("DriftViolations", None): (0, 5),
        ("DriftCheckedRecords", None): (0, 1),
        **{
            ("DriftViolations", check_type): (0, 1)
            for check_type in (
                "baseline_drift_check",
                "data_type_check",
                "categorical_values_check",
                "parse_failure_check",
            )
        },
    }


def test_a_failed_publication_fails_the_run_with_status_4(capture_folder, baseline_dir, tmp_path):
    unreachable = {
        **os.environ,
        "AWS_ENDPOINT_URL_CLOUDWATCH": "http://127.0.0.1:9",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "monitoring",
            "report",
            str(capture_folder),
            "--baseline",
            str(baseline_dir),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            "--publish-metrics",
            "Scones",
            "--endpoint-name",
            "scones-dev",
        ],
        cwd=ROOT,
        env=unreachable,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 4, finished.stderr
    assert finished.stderr.count("\n") == 1 and "cannot publish the metrics to CloudWatch" in finished.stderr
    assert (tmp_path / "out" / "report.html").is_file()  # the report itself was written


def test_publishing_needs_the_endpoint_name(baseline_dir, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        monitoring_main(
            [
                "report",
                str(tmp_path),
                "--baseline",
                str(baseline_dir),
                "--out",
                str(tmp_path),
                "--publish-metrics",
                "Scones",
            ]
        )
    assert exit_.value.code == 2


@pytest.mark.parametrize(
    "until, since_, until_",
    [
        ("2026-11-25T10:10:00.123Z", "2026-11-25T09:00:00+00:00", "2026-11-25T10:00:00+00:00"),
        ("2026-11-25T10:00:00Z", "2026-11-25T09:00:00+00:00", "2026-11-25T10:00:00+00:00"),
        ("2026-11-25T00:59:59Z", "2026-11-24T23:00:00+00:00", "2026-11-25T00:00:00+00:00"),
    ],
)
def test_last_hour_is_the_whole_hour_before_the_run(until, since_, until_):
    from monitoring.__main__ import iso_time

    assert [moment.isoformat() for moment in last_period("1h", iso_time(until))] == [since_, until_]


def test_baseline_goes_to_s3_in_one_command_and_the_report_reads_it_there(
    captured, model, staged, baseline_dir, tmp_path
):
    boto3.client("s3").upload_file(str(model), BUCKET, "models/job-1/output/model.tar.gz")
    location = f"s3://{BUCKET}/monitoring/baseline/"
    assert (
        monitoring_main(
            [
                "baseline",
                "--model",
                f"s3://{BUCKET}/models/job-1/output/model.tar.gz",
                "--data",
                str(staged),
                "--out",
                location,
            ]
        )
        == 0
    )
    keys = [
        entry["Key"]
        for entry in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="monitoring/baseline/")["Contents"]
    ]
    assert sorted(keys) == ["monitoring/baseline/constraints.json", "monitoring/baseline/statistics.json"]
    uploaded = json.loads(boto3.client("s3").get_object(Bucket=BUCKET, Key=keys[1])["Body"].read())
    assert uploaded == json.loads((baseline_dir / "statistics.json").read_text())
    from_s3 = report(captured["inverted"], location, tmp_path / "s3")
    from_folder = report(captured["inverted"], baseline_dir, tmp_path / "folder")
    assert from_s3["checks"] == from_folder["checks"] and BORDER in violated(from_s3)


def test_command_exits_3_on_violation_and_prints_the_report_path(captured, baseline_dir, tmp_path):
    command = [
        sys.executable,
        "-m",
        "monitoring",
        "report",
        "--baseline",
        str(baseline_dir),
        "--no-progress",
        "--fail-on-violation",
    ]
    dark = subprocess.run(
        [*command, captured["dark"], "--out", str(tmp_path / "dark")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dark.returncode == 3, dark.stderr
    assert dark.stdout.strip().endswith(str(tmp_path / "dark" / "report.html"))
    clean = subprocess.run(
        [*command, captured["clean"], "--out", str(tmp_path / "clean")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert clean.returncode == 0, clean.stderr


def data_uris(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


def test_report_is_self_contained_with_decodable_pictures(captured, baseline_dir, tmp_path):
    report(captured["dark"], baseline_dir, tmp_path)
    page = (tmp_path / "report.html").read_text()
    sources = data_uris(page)
    assert len(sources) == 6 and page.count("<img") == 6
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1], validate=True))) as picture:
            picture.load()
            assert picture.format == "PNG" and picture.width > 200
    assert not re.search(r"<script|<link|\ssrc=\"(?!data:)|url\(", page)
    assert "VIOLATION" in page and "image_mean_red" in page
    assert sorted(path.name for path in tmp_path.glob("*.png")) == sorted(
        [
            "class_mix_over_time.png",
            "confidence_over_time.png",
            "low_confidence_over_time.png",
            "lowest_confidence_images.png",
            "neither_over_time.png",
            "top_probability_histogram.png",
        ]
    )


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary on PATH: install Debian's `chromium` "
    "(apt-get install -y chromium) to render report.html headless",
)
def test_report_renders_in_headless_chromium(captured, baseline_dir, tmp_path):
    report(captured["clean"], baseline_dir, tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    # A test-only copy of the page records, once loaded, how many pictures the browser decoded.
    probe = (
        "<script>addEventListener('load', () => { const images = [...document.images];"
        "document.body.dataset.loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;"
        "document.body.dataset.total = images.length; });</script>"
    )
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe + "</body>"))
    browser = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [*browser, "--dump-dom", (tmp_path / "probe.html").as_uri()], capture_output=True, text=True, timeout=60
    )
    assert re.search(r'data-loaded="6"', dom.stdout) and re.search(r'data-total="6"', dom.stdout), dom.stderr[-2000:]
    screenshot = tmp_path / "report.png"
    shot = subprocess.run(
        [
            *browser,
            f"--screenshot={screenshot}",
            "--window-size=1200,2400",
            (tmp_path / "report" / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    with Image.open(screenshot) as picture:
        assert picture.size == (1200, 2400)
        colours = np.asarray(picture.convert("RGB").resize((60, 120))).reshape(-1, 3)
        assert len(np.unique(colours, axis=0)) > 20  # more than a blank page


# ------------------------------------------------------------------------------- the reader, by hand


def png_bytes(mode: str = "RGB", size=(32, 32), color=(200, 30, 30, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color[: len(mode)]).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 40, 220)).save(buffer, "JPEG")
    return buffer.getvalue()


def record(time: str, image: bytes, answer: str, content_type="image/png", output_encoding="JSON") -> str:
    data = base64.b64encode(answer.encode()).decode() if output_encoding == "BASE64" else answer
    return json.dumps(
        {
            "captureData": {
                "endpointInput": {
                    "observedContentType": content_type,
                    "mode": "INPUT",
                    "data": base64.b64encode(image).decode(),
                    "encoding": "BASE64",
                },
                "endpointOutput": {
                    "observedContentType": "application/json",
                    "mode": "OUTPUT",
                    "data": data,
                    "encoding": output_encoding,
                },
            },
            "eventMetadata": {"eventId": "6ee4f1a5-5c9c-4cbb-9fb9-3dc34e4bd8b6", "inferenceTime": time},
            "eventVersion": "0",
        }
    )


@pytest.fixture
def capture_folder(tmp_path):
    """SageMaker-written records in two hour folders, one file gzipped, one line broken."""
    root = tmp_path / "data_capture" / "scones" / "AllTraffic"
    first, second = root / "2026/11/25/08", root / "2026/11/25/09"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    (first / "59-59-123-a.jsonl").write_text(
        "\n".join(
            [
                record("2026-11-25T08:59:59Z", png_bytes("RGBA"), "[0.9388836622238159, 0.061116307973861694]"),
                record(
                    "2026-11-25T08:59:59.512Z", jpeg_bytes(), "[1.2e-05, 0.999988]", "application/x-image", "BASE64"
                ),
                '{"captureData": {"endpointInput": ',
                record("2026-11-25T08:59:59Z", b"not an image", "[0.5, 0.5]"),
            ]
        )
        + "\n"
    )
    (second / "00-01-000-b.jsonl.gz").write_bytes(
        gzip.compress((record("2026-11-25T09:00:01Z", png_bytes(), "[0.6, 0.4]", "image/jpeg") + "\n").encode())
    )
    (second / "notes.txt").write_text("not a capture file\n")
    return tmp_path / "data_capture"


def test_reader_takes_what_sagemaker_writes(capture_folder):
    captures = read_captures(str(capture_folder), progress=False)
    assert len(captures) == 3 and captures.files == 2
    np.testing.assert_allclose(
        captures.probabilities, [[0.9388836622238159, 0.061116307973861694], [1.2e-05, 0.999988], [0.6, 0.4]]
    )
    assert captures.formats == ["PNG/RGBA", "JPEG/RGB", "PNG/RGB"]
    assert captures.sizes == ["32x32", "64x48", "32x32"]
    np.testing.assert_allclose(captures.times - captures.times[0], [0, 0.512, 2.0], atol=1e-6)
    np.testing.assert_allclose(captures.channel_means[0], [200 / 255, 30 / 255, 30 / 255], atol=1e-4)
    np.testing.assert_allclose(captures.channel_stds[0], 0, atol=1e-4)
    np.testing.assert_allclose(captures.border_minus_centre, 0, atol=1e-4)  # plain colours: no contrast
    assert [kept.confidence for kept in captures.lowest] == [0.6, 0.9388836622238159, 0.999988]


def test_reader_counts_broken_lines_with_file_and_line(capture_folder):
    failures = read_captures(str(capture_folder), progress=False).failures
    assert [(Path(failure.file).name, failure.line) for failure in failures] == [
        ("59-59-123-a.jsonl", 3),
        ("59-59-123-a.jsonl", 4),
    ]
    assert "JSONDecodeError" in failures[0].reason and "UnidentifiedImageError" in failures[1].reason


def test_reader_keeps_the_time_range_asked(capture_folder):
    from monitoring.__main__ import iso_time

    captures = read_captures(str(capture_folder), since=iso_time("2026-11-25T09:00:00Z"), progress=False)
    assert len(captures) == 1 and captures.probabilities[0, 0] == 0.6
    captures = read_captures(str(capture_folder), until=iso_time("2026-11-25T08:59:59.5Z"), progress=False)
    assert len(captures) == 1 and captures.formats == ["PNG/RGBA"]


def test_report_on_hand_written_records_flags_format_size_and_failures(capture_folder, baseline_dir, tmp_path):
    summary = report(str(capture_folder), baseline_dir, tmp_path)
    assert summary["windows"] == 2 and summary["unreadable_records"] == 2
    rows = {row["feature_name"]: row for row in summary["checks"]}
    assert (
        rows["capture_record"]["status"] == "VIOLATION"
        and "59-59-123-a.jsonl:3" in rows["capture_record"]["description"]
    )
    assert rows["image_format"]["status"] == rows["image_size"]["status"] == "VIOLATION"
    assert rows["top_probability"]["status"] == "SKIPPED"  # 2 and 1 records: too few for a test


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["report", "/no/such/folder", "--baseline", "{baseline}", "--out", "{out}"],
            "no capture folder /no/such/folder",
        ),
        (["report", "{empty}", "--baseline", "{baseline}", "--out", "{out}"], "no capture files"),
        (["report", "{empty}", "--baseline", "{out}", "--out", "{out}"], "no baseline"),
        (["baseline", "--model", "/no/model.tar.gz", "--data", "{empty}", "--out", "{out}"], "no model archive"),
    ],
)
def test_user_mistakes_give_one_line_errors(baseline_dir, tmp_path, arguments, message):
    (tmp_path / "empty").mkdir()
    filled = [
        argument.format(baseline=baseline_dir, out=tmp_path / "out", empty=tmp_path / "empty") for argument in arguments
    ]
    finished = subprocess.run(
        [sys.executable, "-m", "monitoring", *filled], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 2
    assert finished.stderr.count("\n") == 1 and message in finished.stderr, finished.stderr


def read_only_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes whatever the mode bits say; sysfs refuses new files even to root
        return Path("/sys/scones-report")
    return folder


def monitoring_command(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monitoring", *map(str, arguments)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("where", ["read-only folder", "file", "folder under a file"])
def test_a_report_where_one_cannot_write_fails_in_one_line_naming_the_folder(
    capture_folder, baseline_dir, tmp_path, where
):
    (tmp_path / "a-file").write_text("not a folder\n")
    out = {
        "read-only folder": read_only_folder(tmp_path),
        "file": tmp_path / "a-file",
        "folder under a file": tmp_path / "a-file" / "report",
    }[where]
    finished = monitoring_command("report", capture_folder, "--baseline", baseline_dir, "--out", out, "--no-progress")
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.count("\n") == 1, finished.stderr
    assert finished.stderr.startswith(f"monitoring: error: cannot write the report into {out}: "), finished.stderr


def staged_copy(staged: Path, folder: Path, validation: str) -> Path:
    """The staged data with `validation` as its validation.lst."""
    shutil.copytree(staged, folder)
    (folder / "validation.lst").write_text(validation)
    return folder


def test_baseline_mistakes_about_the_model_and_data_give_one_line_errors(model, staged, tmp_path):
    not_gzip = tmp_path / "notes.txt"
    not_gzip.write_text("not a model archive\n")
    gzip_not_tar = tmp_path / "model.tar.gz"
    gzip_not_tar.write_bytes(gzip.compress(b"not a tar archive"))
    first = (staged / "validation.lst").read_text().splitlines()[0].split("\t")
    cases = [
        (not_gzip, staged, f"monitoring: error: {not_gzip} is not a model archive"),
        (gzip_not_tar, staged, f"monitoring: error: {gzip_not_tar} is not a model archive"),
        (
            model,
            staged_copy(staged, tmp_path / "header", "index\tlabel\tpath\n"),
            f"monitoring: error: {tmp_path / 'header' / 'validation.lst'}:1: the label 'label' is not a number",
        ),
        (
            model,
            staged_copy(staged, tmp_path / "gone", f"0\t{first[1]}\tvalidation/gone.png\n"),
            f"monitoring: error: {tmp_path / 'gone' / 'validation.lst'} lists 1 image(s) that are not there",
        ),
    ]
    for archive, data, message in cases:
        finished = monitoring_command("baseline", "--model", archive, "--data", data, "--out", tmp_path / "out")
        assert finished.returncode == 2, finished.stderr
        assert finished.stderr.count("\n") == 1 and finished.stderr.startswith(message), finished.stderr
    assert not (tmp_path / "out").exists()


def test_a_baseline_written_where_one_cannot_write_fails_in_one_line(model, staged, tmp_path):
    (tmp_path / "a-file").write_text("not a folder\n")
    finished = monitoring_command("baseline", "--model", model, "--data", staged, "--out", tmp_path / "a-file")
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.count("\n") == 1, finished.stderr
    assert finished.stderr.startswith(f"monitoring: error: cannot write the baseline into {tmp_path / 'a-file'}: ")


@pytest.mark.parametrize(
    "statistics, message",
    [
        ("{not json", "statistics.json is not JSON"),
        ('{"version": 0, "features": []}', "are not a baseline of this model's answers"),  # a tabular Model Monitor one
    ],
)
def test_a_report_against_something_else_than_a_baseline_fails_in_one_line(
    capture_folder, baseline_dir, tmp_path, statistics, message
):
    other = tmp_path / "other-baseline"
    other.mkdir()
    (other / "statistics.json").write_text(statistics)
    (other / "constraints.json").write_text('{"version": 0, "features": []}')
    finished = monitoring_command(
        "report", capture_folder, "--baseline", other, "--out", tmp_path / "out", "--no-progress"
    )
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.count("\n") == 1 and message in finished.stderr, finished.stderr


def test_captures_of_the_input_only_are_checked_on_their_images(baseline_dir, tmp_path):
    """An endpoint may capture its requests only (CaptureOptions Input): no answer to check, images still are."""
    hour = tmp_path / "captures" / "scones" / "AllTraffic" / "2026" / "11" / "25" / "08"
    hour.mkdir(parents=True)
    records = []
    for second in range(40):
        captured = json.loads(record(f"2026-11-25T08:00:{second:02d}Z", png_bytes(), "[0.5, 0.5]"))
        del captured["captureData"]["endpointOutput"]
        records.append(json.dumps(captured))
    (hour / "00-00-000-a.jsonl").write_text("\n".join(records) + "\n")
    finished = monitoring_command(
        "report", tmp_path / "captures", "--baseline", baseline_dir, "--out", tmp_path / "out", "--no-progress"
    )
    assert finished.returncode == 0 and finished.stderr == "", finished.stderr
    assert finished.stdout.startswith("40 records")
    statuses = {
        row["feature_name"]: row["status"]
        for row in json.loads((tmp_path / "out" / "summary.json").read_text())["checks"]
    }
    assert statuses["prediction"] == statuses["top_probability"] == statuses["low_confidence"] == "SKIPPED"
    assert statuses["image_std_red"] == "VIOLATION"  # one plain colour: no spread at all
    assert (tmp_path / "out" / "report.html").is_file()


# --------------------------------------------------------------------------------------- statistics


def test_border_minus_centre_is_the_border_band_less_the_middle_half():
    from monitoring.captures import image_statistics

    image = np.full((32, 32, 3), 200, dtype=np.uint8)  # light everywhere...
    image[8:24, 8:24] = 40  # ...but a dark middle half
    image[4:8, 4:28] = 0  # between border band and centre: counted in neither
    means, stds, contrast = image_statistics(np.stack([image, 255 - image]))
    np.testing.assert_allclose(contrast, [(200 - 40) / 255, -(200 - 40) / 255], rtol=1e-5)
    np.testing.assert_allclose(means[1], 1 - means[0], rtol=1e-5)  # inversion mirrors the means...
    np.testing.assert_allclose(stds[1], stds[0], rtol=1e-5)  # ...and keeps the spreads
    red = np.zeros((48, 64, 3), dtype=np.uint8)
    red[:6] = (255, 0, 0)  # a red top band, 48 // 8 = 6 rows of the border
    border_pixels = 48 * 64 - (48 - 12) * (64 - 16)
    assert image_statistics(red[None])[2][0] == pytest.approx(0.299 * 6 * 64 / border_pixels, rel=1e-5)


def test_statistics_match_their_textbook_values():
    assert checks.chi_square_sf(3.841459, 1) == pytest.approx(0.05, abs=1e-6)
    assert checks.chi_square_sf(5.991465, 2) == pytest.approx(0.05, abs=1e-6)
    assert checks.chi_square_sf(7.814728, 3) == pytest.approx(0.05, abs=1e-6)
    rng = np.random.default_rng(1)
    same, shifted = rng.normal(0, 1, 400), rng.normal(0.5, 1, 400)
    assert checks.ks_two_sample(same, rng.normal(0, 1, 400))[1] > 0.01
    distance, p = checks.ks_two_sample(shifted, same)
    assert 0.15 < distance < 0.3 and p < 1e-6
    assert checks.population_stability_index(same, same) == 0
    assert checks.population_stability_index(shifted, same) > 0.2
    assert checks.one_sided_proportion_test(0.5, 100, 0.3, 100) == pytest.approx(0.0019, abs=2e-4)


def test_a_time_range_lists_its_hour_folders_and_the_one_before_only(tmp_path):
    for hour in (7, 8, 9, 10):
        folder = tmp_path / "AllTraffic" / "2026" / "11" / "25" / f"{hour:02d}"
        folder.mkdir(parents=True)
        (folder / "59-59-999-capture.jsonl").write_text("")
    since, until = datetime(2026, 11, 25, 9, tzinfo=UTC), datetime(2026, 11, 25, 10, tzinfo=UTC)
    hours = [Path(name).parent.name for name in list_capture_files(str(tmp_path), since, until)]
    assert hours == ["08", "09"]  # a file begun at 08:59 may hold records of 09:xx; 10:00 is past the range


def test_an_s3_time_range_lists_only_the_date_folders_that_may_hold_it(monkeypatch):
    from moto import mock_aws

    with mock_aws():
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="captures")
        hours = ["2025/01/01/00", "2026/10/25/09", "2026/11/24/09", "2026/11/25/08", "2026/11/25/09", "2026/11/25/10"]
        for hour in hours:
            s3.put_object(Bucket="captures", Key=f"data_capture/e/AllTraffic/{hour}/59-59-999-x.jsonl", Body=b"")
        listed = []
        boto3.setup_default_session()  # a session of its own, dropped below, for the listing hook
        boto3.DEFAULT_SESSION.events.register(
            "provide-client-params.s3.ListObjectsV2", lambda params, **_: listed.append(params["Prefix"])
        )
        since, until = datetime(2026, 11, 25, 9, tzinfo=UTC), datetime(2026, 11, 25, 10, tzinfo=UTC)
        try:
            files = list_capture_files("s3://captures/data_capture/e/", since, until)
        finally:
            boto3.DEFAULT_SESSION = None
    assert [name.split("AllTraffic/")[1][:13] for name in files] == ["2026/11/25/08", "2026/11/25/09"]
    # the endpoint, variant, year, month and day folders, then the two hours: not 2025, October, the 24th or 10:00
    assert sorted(listed) == sorted(
        f"data_capture/e/{folder}"
        for folder in (
            "",
            "AllTraffic/",
            "AllTraffic/2026/",
            "AllTraffic/2026/11/",
            "AllTraffic/2026/11/25/",
            "AllTraffic/2026/11/25/08/",
            "AllTraffic/2026/11/25/09/",
        )
    )


# ------------------------------------------------- "neither": 1 - sum of the answer, on synthetic answers

SETTINGS = {"classes": list(CLASSES), "threshold": 0.8, "temperature": 1.0}
NEITHER_ANSWER = [0.05, 0.02]  # a model that learnt "neither": 0.93 of it


def vehicle_answers(count: int, seed: int = 0, neither: float = 0.0) -> list[list[float]]:
    """Confident answers, bicycle and motorcycle alike, leaving `neither` to neither."""
    rng = np.random.default_rng(seed)
    tops = rng.uniform(0.85, 0.99, count) * (1 - neither)
    return [[top, 1 - neither - top][:: 1 if index % 2 else -1] for index, top in enumerate(tops)]


def synthetic_baseline(folder: Path, answers: list[list[float]]) -> Path:
    """A baseline of these validation answers and of training images like the captured ones (png_bytes)."""
    images = folder / "training"
    images.mkdir(parents=True)
    for index in range(40):
        (images / f"{index}.png").write_bytes(png_bytes())
    from monitoring import baseline

    statistics, constraints = baseline.statistics_of(
        np.array(answers), baseline.image_statistics(sorted(images.glob("*.png"))), SETTINGS
    )
    baseline.write(statistics, constraints, folder / "baseline")
    return folder / "baseline"


def synthetic_captures(folder: Path, answers: list[list[float]]) -> Path:
    hour = folder / "scones" / "AllTraffic" / "2026" / "11" / "25" / "08"
    hour.mkdir(parents=True)
    lines = [
        record(f"2026-11-25T08:{index // 60:02d}:{index % 60:02d}Z", png_bytes(), json.dumps(answer))
        for index, answer in enumerate(answers)
    ]
    (hour / "00-00-000-a.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def rows_of(summary: dict) -> dict[str, dict]:
    return {row["feature_name"]: row for row in summary["checks"]}


def test_neither_is_what_the_answer_leaves_and_zero_for_answers_that_sum_to_1():
    classic = np.array([[0.9388836622238159, 0.061116307973861694], [0.3, 0.7], [np.float32(0.6), np.float32(0.4)]])
    np.testing.assert_array_equal(checks.neither_probability(classic), 0)  # rounding either side of 1
    assert not checks.neither_most_likely(classic).any()
    three_way = np.array([NEITHER_ANSWER, [0.45, 0.1], [0.7, 0.2]])
    np.testing.assert_allclose(checks.neither_probability(three_way), [0.93, 0.45, 0.1])
    assert checks.neither_most_likely(three_way).tolist() == [True, False, False]


def test_classic_answers_give_a_neither_baseline_of_zero_and_pass_the_check(tmp_path):
    baseline_dir = synthetic_baseline(tmp_path, vehicle_answers(100))
    statistics = json.loads((baseline_dir / "statistics.json").read_text())
    assert checks.feature(statistics, "neither")["numerical_statistics"]["mean"] == 0
    assert checks.feature(statistics, "neither_probability")["numerical_statistics"]["max"] == 0
    summary = report(
        str(synthetic_captures(tmp_path / "captures", vehicle_answers(60, seed=1))), baseline_dir, tmp_path
    )
    rows = rows_of(summary)
    assert rows["neither"]["status"] == "OK" and "0.0% of answers most likely neither" in rows["neither"]["description"]
    assert summary["neither_share"] == 0 and summary["violations"] == 0, summary["checks"]


def test_a_window_of_many_neither_answers_against_a_baseline_of_few_violates(tmp_path):
    from monitoring import metrics

    validation = vehicle_answers(98, neither=0.03) + [NEITHER_ANSWER] * 2
    baseline_dir = synthetic_baseline(tmp_path, validation)
    statistics = json.loads((baseline_dir / "statistics.json").read_text())
    assert checks.feature(statistics, "neither")["numerical_statistics"]["mean"] == pytest.approx(0.02)
    assert sum(checks.category_counts(statistics, "prediction").values()) == 98  # neither answers name no class
    window = vehicle_answers(40, seed=2, neither=0.03) + [NEITHER_ANSWER] * 20
    summary = report(str(synthetic_captures(tmp_path / "captures", window)), baseline_dir, tmp_path / "out")
    rows = rows_of(summary)
    assert rows["neither"]["status"] == "VIOLATION", rows["neither"]
    assert rows["neither"]["description"].startswith("33.3% of answers most likely neither (baseline 2.0%")
    # The class mix is that of the answers naming a class: unmoved, and it says what it left out.
    assert rows["prediction"]["status"] == "OK", rows["prediction"]
    assert "20 answers most likely neither left out" in rows["prediction"]["description"]
    assert summary["neither_share"] == pytest.approx(1 / 3)
    (share,) = [datum for datum in metrics.metric_data(summary, "scones-dev") if datum["MetricName"] == "NeitherShare"]
    assert (share["Value"], share["Unit"]) == (pytest.approx(100 / 3), "Percent")


def test_a_window_of_neither_answers_only_skips_the_class_mix(tmp_path):
    baseline_dir = synthetic_baseline(tmp_path, vehicle_answers(100))
    summary = report(
        str(synthetic_captures(tmp_path / "captures", [NEITHER_ANSWER] * 40)), baseline_dir, tmp_path / "out"
    )
    rows = rows_of(summary)
    assert rows["prediction"]["status"] == "SKIPPED" and rows["neither"]["status"] == "VIOLATION"
    assert summary["neither_share"] == 1


def test_a_baseline_written_before_neither_skips_that_check_only(tmp_path):
    baseline_dir = synthetic_baseline(tmp_path, vehicle_answers(100))
    statistics = json.loads((baseline_dir / "statistics.json").read_text())
    statistics["features"] = [entry for entry in statistics["features"] if not entry["name"].startswith("neither")]
    (baseline_dir / "statistics.json").write_text(json.dumps(statistics))
    constraints = json.loads((baseline_dir / "constraints.json").read_text())
    constraints["features"] = [entry for entry in constraints["features"] if not entry["name"].startswith("neither")]
    del constraints["monitoring_config"]["thresholds"]["neither_margin"]
    (baseline_dir / "constraints.json").write_text(json.dumps(constraints))
    window = vehicle_answers(40, seed=3) + [NEITHER_ANSWER] * 20
    summary = report(str(synthetic_captures(tmp_path / "captures", window)), baseline_dir, tmp_path / "out")
    rows = rows_of(summary)
    assert rows["neither"]["status"] == "SKIPPED", rows["neither"]
    assert "no neither statistics" in rows["neither"]["description"] and "rebuild it" in rows["neither"]["description"]
    assert rows["top_probability"]["status"] != "SKIPPED" and rows["prediction"]["status"] == "OK"


def test_report_shows_the_neither_share(tmp_path):
    baseline_dir = synthetic_baseline(tmp_path, vehicle_answers(100))
    window = vehicle_answers(45, seed=4) + [NEITHER_ANSWER] * 15
    report(str(synthetic_captures(tmp_path / "captures", window)), baseline_dir, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Of 60 answers, 25.0% were most likely neither." in page
    assert "25.0% of answers most likely neither (baseline 0.0%" in page
    assert 'alt="neither_over_time.png"' in page
    with Image.open(tmp_path / "out" / "neither_over_time.png") as picture:
        assert picture.format == "PNG" and picture.width > 200


def test_report_names_the_threshold_the_filter_applied(tmp_path, capsys):
    baseline_dir = synthetic_baseline(tmp_path, vehicle_answers(100))  # the model's own threshold: 0.8
    captures = str(synthetic_captures(tmp_path / "captures", vehicle_answers(30, seed=5)))
    summary = report(captures, baseline_dir, tmp_path / "override", "--filter-threshold", "0.93")
    assert (summary["filter_threshold"], summary["model_threshold"]) == (0.93, 0.8)
    page = (tmp_path / "override" / "report.html").read_text()
    assert "The workflow's filter applied the threshold 0.930; the checks use the model's own, 0.800," in page
    report(captures, baseline_dir, tmp_path / "model", "--filter-threshold", "0.8")
    assert (
        "The workflow's filter applied the model's own threshold, 0.800."
        in (tmp_path / "model" / "report.html").read_text()
    )
    arguments = ["report", captures, "--baseline", str(baseline_dir), "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exited:
        monitoring_main([*arguments, "--filter-threshold", "1.5"])
    assert exited.value.code == 2
    assert "argument --filter-threshold: '1.5' is not a probability between 0 and 1" in capsys.readouterr().err
