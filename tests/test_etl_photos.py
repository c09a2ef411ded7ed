"""`python -m training.etl --photos`: a company's own labelled photos staged beside the CIFAR images."""

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_etl import cifar_members, staged_files, tiny_cifar, write_archive

from training import etl, photos
from training.data import load_split

ROOT = Path(__file__).resolve().parent.parent
# The real photographs beside the checkout (../shared/data/README.md): read from there, never copied into the repo.
DEV_PHOTOS = etl.SHARED_ARCHIVE.parent / "real-photos-dev"
needs_dev_photos = pytest.mark.skipif(not DEV_PHOTOS.is_dir(), reason=f"the real photos are not at {DEV_PHOTOS}")
CLASSES, EXTRA = ["bicycle", "motorcycle"], ["bus"]  # labels 0, 1 and 2; "neither" takes 3
NEITHER_LABEL = 3


def encoded(mode="RGB", size=(40, 30), format="JPEG", seed=0, **options) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode) if mode != "P" else 1))
    image = Image.fromarray(pixels.astype(np.uint8).squeeze(), "L" if mode == "P" else mode)
    image = image.convert("P") if mode == "P" else image
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view", as a phone held upright writes
    return encoded(size=(48, 24), seed=4, exif=exif)


def huge_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")  # 100 megapixels in 12 KB
    return buffer.getvalue()


GOOD = {
    "bicycle/IMG_0001.JPG": encoded(seed=1),
    "bicycle/2024/06/upright.jpeg": exif_rotated(),
    "bicycle/grey.jpg": encoded("L", seed=2),
    "motorcycle/screenshot.png": encoded("RGBA", format="PNG", seed=3),
    "motorcycle/palette.png": encoded("P", format="PNG", seed=5),
    "motorcycle/from a camera.webp": encoded(format="WEBP", seed=6),
    "bus/bus.jpg": encoded(seed=7),
    "neither/cat.jpg": encoded(seed=8),
    "neither/flower.PNG": encoded(format="PNG", seed=9),
}
GOOD_EXTENSIONS = [".jpg", ".jpg", ".jpg", ".png", ".png", ".webp", ".jpg", ".jpg", ".png"]
WHOLE = encoded(size=(200, 150), seed=10)
TRUNCATED = WHOLE[: len(WHOLE) // 2]
BAD = {
    "bicycle/notes.txt": (b"not a photo\n", "not an image in a photo format (JPEG, PNG, WEBP, GIF, BMP, TIFF)"),
    "bicycle/empty.jpg": (b"", "not an image in a photo format (JPEG, PNG, WEBP, GIF, BMP, TIFF)"),
    "motorcycle/truncated.jpg": (TRUNCATED, "unreadable: image file is truncated"),
    "motorcycle/huge.png": (
        huge_png(),
        "10000x10000 pixels: more than a camera makes (over 50 megapixels)",
    ),
    "car/car.jpg": (encoded(seed=11), "folder 'car' is no class (bicycle/, motorcycle/, bus/, neither/)"),
    "loose.jpg": (encoded(seed=12), "not in a class folder (bicycle/, motorcycle/, bus/, neither/)"),
}


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for path, content in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(content)
    return folder


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def rows(out: Path, name: str) -> list[tuple[int, str]]:
    return [(int(line.split("\t")[1]), line.split("\t")[2]) for line in (out / name).read_text().splitlines()]


def photo_splits(out: Path) -> dict[str, str]:
    """Staged photo path -> the split whose manifest lists it."""
    return {
        path: split
        for split in ("train", "validation")
        for _, path in rows(out, f"{split}.lst")
        if path.startswith(photos.STAGED_PREFIX)
    }


@pytest.fixture
def archive(tmp_path):
    return write_archive(tmp_path / "tiny-cifar.tar.gz", cifar_members(tiny_cifar()))


def stage(archive, out, source, **options):
    return etl.stage(archive, out, CLASSES, extra_classes=EXTRA, progress=False, photos=source, **options)


# ----------------------------------------------------------------------------------------- staging


def test_photos_are_staged_as_their_bytes_listed_with_their_labels_and_recorded(tmp_path, archive):
    source = write_folder(tmp_path / "photos", GOOD | {path: content for path, (content, _) in BAD.items()})
    without = stage(archive, tmp_path / "cifar-only", None, validation_fraction=0.3)
    out = tmp_path / "out"
    summary = stage(archive, out, source, validation_fraction=0.3)

    labels = {name: label for label, name in enumerate([*CLASSES, *EXTRA, "neither"])}
    expected = {
        f"train/photo-{sha256(content)[:16]}{extension}": (path, content)
        for (path, content), extension in zip(GOOD.items(), GOOD_EXTENSIONS, strict=True)
    }
    assert summary.dataset["photos"]["staged"] == {name: path for name, (path, _) in sorted(expected.items())}
    for name, (_, content) in expected.items():
        assert (out / name).read_bytes() == content  # the original bytes, EXIF and all
        assert summary.dataset["files"][name] == sha256(content)
    with Image.open(out / next(name for name, (path, _) in expected.items() if "upright" in path)) as image:
        assert image.getexif()[0x0112] == 6

    splits = photo_splits(out)
    assert sorted(splits) == sorted(expected)
    for split in ("train", "validation"):
        listed, cifar = rows(out, f"{split}.lst"), rows(tmp_path / "cifar-only", f"{split}.lst")
        assert listed[: len(cifar)] == cifar  # the CIFAR lines as without photos; the photos after them
        for label, name in listed[len(cifar) :]:
            assert label == labels[expected[name][0].split("/")[0]]
        lines = (out / f"{split}.lst").read_text().splitlines()
        assert [int(line.split("\t")[0]) for line in lines] == list(range(len(lines)))
    assert (out / "test.lst").read_bytes() == (tmp_path / "cifar-only" / "test.lst").read_bytes()

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["extra_classes"][-1] == {"name": "neither", "label": NEITHER_LABEL, "cifar_fine_label": None}
    section = dataset["photos"]
    assert section["source"] == str(source.resolve())
    photo_counts = {
        split: {
            name: sum(splits[photo] == split and path.startswith(f"{name}/") for photo, (path, _) in expected.items())
            for name in labels
        }
        for split in ("train", "validation")
    }
    assert section["counts"] == photo_counts
    assert sum(photo_counts["validation"].values()) > 0 and sum(photo_counts["train"].values()) > 0
    for split in ("train", "validation"):
        for name in labels:
            assert (
                dataset["counts"][split][name]
                == without.dataset["counts"][split].get(name, 0) + photo_counts[split][name]
            )
    assert dataset["counts"]["test"]["neither"] == 0
    assert [item["path"] for item in section["skipped"]] == sorted(BAD)
    for item in section["skipped"]:
        assert item["reason"].startswith(BAD[item["path"]][1])
    assert not [path for path in staged_files(out) if path.endswith(".tmp")]


def test_the_training_script_reads_every_staged_photo_here_and_as_sagemaker_downloads_the_channel(tmp_path, archive):

    out = tmp_path / "out"
    stage(archive, out, write_folder(tmp_path / "photos", GOOD))
    channel = shutil.copytree(out / "train", tmp_path / "channel")  # the S3 prefix `train`, without `train/`
    for data_dir in (out, channel):
        images, labels, paths = load_split(data_dir, out / "train.lst")
        assert len(images) == len(rows(out, "train.lst")) and sum(path.startswith("train/photo-") for path in paths)


def test_no_neither_photo_adds_no_label(tmp_path, archive):
    summary = stage(archive, tmp_path / "out", write_folder(tmp_path / "photos", {"bicycle/a.jpg": encoded()}))
    assert [entry["name"] for entry in summary.dataset["extra_classes"]] == EXTRA
    assert "neither" not in summary.dataset["counts"]["train"]
    assert max(label for label, _ in rows(tmp_path / "out", "train.lst")) < NEITHER_LABEL


def test_the_split_is_by_content_and_adding_photos_moves_none(tmp_path, archive):
    many = {f"{CLASSES[index % 2]}/{index:03d}.jpg": encoded(size=(8, 8), seed=100 + index) for index in range(40)}
    source = write_folder(tmp_path / "photos", dict(list(many.items())[:30]))
    stage(archive, tmp_path / "first", source, validation_fraction=0.5)
    first = photo_splits(tmp_path / "first")
    assert 5 < list(first.values()).count("validation") < 25

    write_folder(source, dict(list(many.items())[30:]))
    (source / "bicycle" / "000.jpg").rename(source / "bicycle" / "renamed.jpg")
    stage(archive, tmp_path / "first", source, validation_fraction=0.5)
    stage(archive, tmp_path / "again", source, validation_fraction=0.5)
    grown = photo_splits(tmp_path / "first")
    assert len(grown) == 40 and grown == photo_splits(tmp_path / "again")
    assert {path: grown[path] for path in first} == first

    stage(archive, tmp_path / "other-seed", source, validation_fraction=0.5, seed=1)
    assert photo_splits(tmp_path / "other-seed") != grown


def test_a_photo_labelled_twice_is_skipped_and_a_copy_staged_once(tmp_path, archive):
    twice, copied = encoded(seed=20), encoded(seed=21)
    source = write_folder(
        tmp_path / "photos",
        {"bicycle/a.jpg": twice, "motorcycle/a.jpg": twice, "neither/x.jpg": copied, "neither/y.jpg": copied},
    )
    out = tmp_path / "out"
    summary = stage(archive, out, source)
    assert list(summary.dataset["photos"]["staged"].values()) == ["neither/x.jpg"]
    assert summary.dataset["photos"]["skipped"] == [
        {"path": "bicycle/a.jpg", "reason": "the same photo is labelled bicycle and motorcycle"},
        {"path": "motorcycle/a.jpg", "reason": "the same photo is labelled bicycle and motorcycle"},
        {"path": "neither/y.jpg", "reason": "the same photo as neither/x.jpg, staged once"},
    ]
    assert sorted(path for path in staged_files(out) if "photo" in path) == [f"train/photo-{sha256(copied)[:16]}.jpg"]


def test_a_second_run_writes_nothing_new_and_a_killed_one_is_completed(tmp_path, archive):
    source, out = write_folder(tmp_path / "photos", GOOD), tmp_path / "out"
    first = stage(archive, out, source)
    before = staged_files(out)
    second = stage(archive, out, source)
    assert second.written == [] and staged_files(out) == before
    assert second.report().startswith(f"nothing new: {len(before)} files already staged")

    photo = next(path for path in before if path.startswith("train/photo-"))
    (out / photo).unlink()
    (out / "train" / ".photo-0123456789abcdef.jpg.999.tmp").write_bytes(b"half")  # left by a killed run
    third = stage(archive, out, source)
    assert third.written == [photo] and staged_files(out).keys() == before.keys()
    assert (out / photo).read_bytes() == (source / first.dataset["photos"]["staged"][photo]).read_bytes()


@needs_dev_photos
def test_real_photos_are_staged(tmp_path, archive):
    """Two photos of each folder of real-photos-dev: bicycles, motorcycles, and cars and others as "neither"."""
    picked = {
        f"{label}/{path.name}": path
        for folder, label in (
            ("bicycle", "bicycle"),
            ("motorcycle", "motorcycle"),
            ("car", "neither"),
            ("other", "neither"),
        )
        for path in sorted((DEV_PHOTOS / folder).iterdir())[:2]
    }
    source = tmp_path / "photos"
    for relative, path in picked.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).symlink_to(path)
    summary = stage(archive, tmp_path / "out", source)
    assert summary.dataset["photos"]["skipped"] == []
    assert sorted(summary.dataset["photos"]["staged"].values()) == sorted(picked)
    for name, relative in summary.dataset["photos"]["staged"].items():
        assert (tmp_path / "out" / name).read_bytes() == picked[relative].read_bytes()
    assert (
        sum(
            label == NEITHER_LABEL
            for split in ("train", "validation")
            for label, _ in rows(tmp_path / "out", f"{split}.lst")
        )
        == 4
    )


# ---------------------------------------------------------------------------------------------- S3


def test_reviewed_photos_are_staged_from_an_s3_prefix_and_uploaded_once(tmp_path, archive, s3):
    files = GOOD | {"car/car.jpg": BAD["car/car.jpg"][0], "motorcycle/truncated.jpg": TRUNCATED}
    for path, content in files.items():
        s3.put_object(Bucket="scones-data", Key=f"labels/{path}", Body=content)
    s3.put_object(Bucket="scones-data", Key="labels/neither/", Body=b"")  # a folder made in the console
    s3.put_object(Bucket="scones-data", Key="labelsX/bicycle/other.jpg", Body=encoded(seed=30))

    out = tmp_path / "out"
    summary = stage(archive, out, "s3://scones-data/labels", bucket="scones-data")
    local = stage(archive, tmp_path / "from-folder", write_folder(tmp_path / "photos", files))
    assert summary.dataset["photos"]["source"] == "s3://scones-data/labels/"
    for key in ("staged", "skipped", "counts"):
        assert summary.dataset["photos"][key] == local.dataset["photos"][key]
    assert (out / "train.lst").read_bytes() == (tmp_path / "from-folder" / "train.lst").read_bytes()
    for name in summary.dataset["photos"]["staged"]:
        head = s3.head_object(Bucket="scones-data", Key=name)
        assert head["Metadata"] == {"sha256": summary.dataset["files"][name]}
        assert head["ContentType"] == etl.CONTENT_TYPES[Path(name).suffix]
        assert s3.get_object(Bucket="scones-data", Key=name)["Body"].read() == (out / name).read_bytes()

    again = stage(archive, out, "s3://scones-data/labels/", bucket="scones-data", s3_client=s3)
    assert again.written == [] and again.uploaded == []


def test_an_unreadable_s3_photo_stops_the_run(tmp_path, archive, s3):
    s3.put_object(Bucket="scones-data", Key="labels/bicycle/a.jpg", Body=encoded())

    def refuse(params, **_):
        raise s3.exceptions.ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")

    s3.meta.events.register("before-call.s3.GetObject", refuse)
    with pytest.raises(etl.BadPhotoSource, match="^cannot read s3://scones-data/labels/bicycle/a.jpg: .*AccessDenied"):
        stage(archive, tmp_path / "out", "s3://scones-data/labels/", s3_client=s3)


# ------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "photos_argument, message",
    [
        ("{tmp}/absent", "error: no photo folder at {tmp}/absent"),
        ("{tmp}/a-file.jpg", "error: {tmp}/a-file.jpg is a file; --photos takes a folder with a subfolder per class"),
        ("{tmp}/empty", "error: {tmp}/empty holds no files; it should hold a subfolder of photos per class"),
        (
            "s3://scones-data/labels/",
            "error: s3://scones-data/labels/ holds no objects; it should hold <class>/<photo>",
        ),
        ("s3://absent-bucket/labels/", "error: cannot list s3://absent-bucket/labels/: "),
    ],
)
def test_a_bad_photos_argument_is_one_line_and_writes_nothing(tmp_path, archive, s3, capsys, photos_argument, message):
    (tmp_path / "a-file.jpg").write_bytes(encoded())
    (tmp_path / "empty" / "bicycle").mkdir(parents=True)
    s3.put_object(Bucket="scones-data", Key="labels-elsewhere/bicycle/a.jpg", Body=encoded())
    arguments = [
        "--source",
        str(archive),
        "--out",
        str(tmp_path / "out"),
        "--photos",
        photos_argument.format(tmp=tmp_path),
    ]
    assert etl.main(arguments) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith(message.format(tmp=tmp_path))
    assert not (tmp_path / "out").exists()


def test_command_lists_skipped_photos_and_reports_the_photos(tmp_path, archive, capsys):
    source = write_folder(tmp_path / "photos", GOOD | {path: content for path, (content, _) in BAD.items()})
    out = tmp_path / "out"
    assert (
        etl.main(["--source", str(archive), "--out", str(out), "--extra-classes", "bus", "--photos", str(source)]) == 0
    )
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"skipped photo {path}" for path in sorted(BAD)]
    assert lines[0] == f"skipped photo bicycle/empty.jpg: {BAD['bicycle/empty.jpg'][1]}"
    staged = json.loads((tmp_path / "out" / "dataset.json").read_text())["photos"]["counts"]
    train, validation = (sum(staged[split].values()) for split in ("train", "validation"))
    assert captured.out.splitlines()[1] == (
        f"photos from {source}: {train} for training, {validation} for validation, "
        f"{len(BAD)} skipped (listed in dataset.json under photos.skipped)"
    )


def test_help_documents_photos():
    helped = subprocess.run(
        [sys.executable, "-m", "training.etl", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0
    assert "--photos DIR|s3://BUCKET/PREFIX/" in helped.stdout and "photos.skipped" in helped.stdout


def test_the_etl_stages_no_photo_the_endpoint_would_refuse():
    from training import inference

    assert photos.MAX_PHOTO_PIXELS == inference.MAX_PIXELS
