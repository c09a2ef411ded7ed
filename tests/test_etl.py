"""The CIFAR-100 ETL: tiny archives written here in the official format, and the shared vehicles copy."""

import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import pickletools
import re
import shlex
import socket
import struct
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from numpy._core.multiarray import _reconstruct
from numpy.testing._private.utils import runstring
from PIL import Image

from training import etl
from training.cifar import OFFICIAL_MD5
from training.etl import SHARED_ARCHIVE as SHARED

ROOT = Path(__file__).resolve().parent.parent
needs_shared = pytest.mark.skipif(not SHARED.is_file(), reason=f"the shared CIFAR-100 copy is not at {SHARED}")
SUBSET = SHARED.with_name("cifar-100-python-subset.tar.gz")
needs_subset = pytest.mark.skipif(not SUBSET.is_file(), reason=f"the shared CIFAR-100 subset is not at {SUBSET}")

# "rocket" is in the tiny meta but has no images.
TINY_NAMES = ["apple", "bicycle", "bus", "motorcycle", "rocket"]
TINY_CLASSES = ["bicycle", "bus", "motorcycle"]
MANIFEST_LINE = re.compile(r"(\d+)\t(\d+)\t((train|test)/[A-Za-z0-9_]+(\.[a-z_]+)?\.png)")


# ----------------------------------------------------------------------------------- tiny archives


class Py2Pickler(pickle._Pickler):
    """Writes protocol 2 as Python 2 did for the official files: bytes as Python 2 `str` (SHORT_BINSTRING,
    BINSTRING) rather than `_codecs.encode` calls, and NumPy's reconstructor under its NumPy 1 name."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, value: bytes):
        if len(value) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(value)]) + value)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(value)) + value)
        self.memoize(value)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if obj is _reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(value) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(value)
    return buffer.getvalue()


def tiny_cifar(train_per_class=10, test_per_class=4, seed=1) -> dict[str, dict]:
    """meta, train and test of a tiny CIFAR-100 with the official keys, strings as Python 2 `str`."""
    rng = np.random.default_rng(seed)

    def split(per_class, batch_label):
        fine_labels = rng.permutation([TINY_NAMES.index(name) for name in TINY_CLASSES for _ in range(per_class)])
        count = len(fine_labels)
        return {
            b"filenames": [
                f"{TINY_NAMES[label]}_s_{seed:02d}{index:04d}.png".encode() for index, label in enumerate(fine_labels)
            ],
            b"batch_label": batch_label,
            b"fine_labels": [int(label) for label in fine_labels],
            b"coarse_labels": [18] * count,
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        }

    return {
        "meta": {b"fine_label_names": [name.encode() for name in TINY_NAMES], b"coarse_label_names": [b"vehicles_1"]},
        "train": split(train_per_class, b"training batch 1 of 1"),
        "test": split(test_per_class, b"testing batch 1 of 1"),
    }


def cifar_members(cifar: dict[str, dict]) -> dict[str, bytes]:
    return {f"cifar-100-python/{name}": py2_pickle(content) for name, content in cifar.items()}


def write_archive(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


@pytest.fixture
def cifar():
    return tiny_cifar()


@pytest.fixture
def archive(tmp_path, cifar):
    return write_archive(tmp_path / "tiny-cifar.tar.gz", cifar_members(cifar))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def staged_files(out: Path) -> dict[str, int]:
    """Every file under `out` (temporary ones included) with its modification time."""
    return {path.relative_to(out).as_posix(): path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}


def manifest(out: Path, name: str) -> list[tuple[int, int, str]]:
    rows = []
    for line in (out / name).read_text().splitlines():
        match = MANIFEST_LINE.fullmatch(line)
        assert match, f"{name}: {line!r} is not index<TAB>label<TAB>path"
        rows.append((int(match[1]), int(match[2]), match[3]))
    return rows


def pixels_from_row(row: np.ndarray) -> np.ndarray:
    """The 32x32 RGB image of a CIFAR row, spelled out: pixel (y, x) of channel c is byte c*1024 + y*32 + x."""
    return np.array(
        [[[row[channel * 1024 + y * 32 + x] for channel in range(3)] for x in range(32)] for y in range(32)],
        dtype=np.uint8,
    )


def decoded(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        return np.asarray(image)


# ----------------------------------------------------------------------------------------- reading


@needs_shared
def test_tiny_archives_are_pickled_like_the_shared_copy(cifar):
    def opcodes_and_globals(data: bytes):
        ops = list(pickletools.genops(data))
        return {op.name for op, _, _ in ops}, {arg for op, arg, _ in ops if op.name == "GLOBAL"}

    with tarfile.open(SHARED) as tar:
        shared = opcodes_and_globals(tar.extractfile("cifar-100-python/train").read())
    tiny = opcodes_and_globals(py2_pickle(cifar["train"]))
    assert tiny[1] == shared[1] == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert tiny[0] <= shared[0]


@pytest.mark.parametrize("encoding", ["bytes", "latin1"])
def test_both_pickle_encodings_read_the_same(archive, cifar, encoding):
    read = etl.read_archive(archive, encoding=encoding)
    assert read.fine_label_names == TINY_NAMES
    for name, split in (("train", read.train), ("test", read.test)):
        assert split.filenames == [filename.decode() for filename in cifar[name][b"filenames"]]
        assert split.fine_labels.tolist() == cifar[name][b"fine_labels"]
        assert np.array_equal(split.data, cifar[name][b"data"])


@pytest.mark.parametrize(
    "payload, refused",
    [
        (lambda marker: (os.system, (f"touch {shlex.quote(str(marker))}",)), f"{os.system.__module__}.system"),
        (
            lambda marker: (runstring, (f"open({str(marker)!r}, 'w').close()", {})),
            "numpy.testing._private.utils.runstring",
        ),
    ],
)
def test_a_pickle_that_runs_code_is_refused(tmp_path, cifar, payload, refused):
    class RunsCode:
        def __init__(self, marker):
            self.marker = marker

        def __reduce__(self):
            return payload(self.marker)

    plain_marker, etl_marker = tmp_path / "ran-with-plain-pickle", tmp_path / "ran-in-etl"
    pickle.loads(py2_pickle({b"data": RunsCode(plain_marker)}), encoding="bytes")
    assert plain_marker.exists(), "the tampered pickle should run its code when loaded with plain pickle"

    members = cifar_members(cifar)
    members["cifar-100-python/train"] = py2_pickle({**cifar["train"], b"data": RunsCode(etl_marker)})
    tampered = write_archive(tmp_path / "tampered.tar.gz", members)
    with pytest.raises(etl.UnsafeArchive, match=re.escape(refused)):
        etl.stage(tampered, tmp_path / "out", progress=False)
    assert not etl_marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("odd_name", ["../cifar-100-python/meta", "/etc/cifar", "cifar-100-python/../../x"])
def test_members_with_odd_paths_are_refused(tmp_path, cifar, odd_name):
    tampered = write_archive(tmp_path / "odd.tar.gz", {odd_name: b"x", **cifar_members(cifar)})
    with pytest.raises(etl.UnsafeArchive, match=re.escape(repr(odd_name))):
        etl.read_archive(tampered)


def test_a_member_that_is_a_link_is_refused(tmp_path, cifar):
    members = cifar_members(cifar)
    members.pop("cifar-100-python/meta")
    tampered = write_archive(tmp_path / "link.tar.gz", members, links={"cifar-100-python/meta": "/etc/passwd"})
    with pytest.raises(etl.UnsafeArchive, match="cifar-100-python/meta is not a single regular file"):
        etl.read_archive(tampered)


def test_an_image_name_with_a_path_is_refused(tmp_path, cifar):
    cifar["train"][b"filenames"][0] = b"../../escaped.png"
    tampered = write_archive(tmp_path / "names.tar.gz", cifar_members(cifar))
    with pytest.raises(etl.UnsafeArchive, match=re.escape("'../../escaped.png'")):
        etl.stage(tampered, tmp_path / "out", TINY_CLASSES, progress=False)
    assert not list(tmp_path.rglob("escaped.png"))


def rows_of(split: dict, name: str) -> list[int]:
    return [row for row, label in enumerate(split[b"fine_labels"]) if TINY_NAMES[label] == name]


@pytest.mark.parametrize("same_pixels", [False, True])
def test_two_images_of_one_class_with_one_name_are_refused(tmp_path, cifar, same_pixels):
    """CIFAR-100 never does this and a tampered archive would: even the same pixels are refused, not dropped."""
    first, second = rows_of(cifar["test"], "bus")[:2]
    name = cifar["test"][b"filenames"][second] = cifar["test"][b"filenames"][first]
    if same_pixels:
        cifar["test"][b"data"][second] = cifar["test"][b"data"][first]
    doubled = write_archive(tmp_path / "doubled.tar.gz", cifar_members(cifar))
    with pytest.raises(etl.CorruptArchive, match=f"more than one image of class bus named test/{name.decode()}$"):
        etl.stage(doubled, tmp_path / "out", TINY_CLASSES, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def shared_name(tmp_path, cifar):
    """An archive whose later (in archive order) training image of bus has the name of an earlier bicycle's."""
    bicycle = rows_of(cifar["train"], "bicycle")[0]
    bus = next(row for row in rows_of(cifar["train"], "bus") if row > bicycle)
    name = cifar["train"][b"filenames"][bus] = cifar["train"][b"filenames"][bicycle]
    archive = write_archive(tmp_path / "shared-name.tar.gz", cifar_members(cifar))
    return archive, name.decode(), bicycle, bus


@pytest.mark.parametrize("encoding", ["bytes", "latin1"])
def test_images_of_two_classes_with_one_name_are_both_staged(tmp_path, cifar, shared_name, encoding, monkeypatch):
    monkeypatch.setattr(etl, "read_archive", functools.partial(etl.read_archive, encoding=encoding))
    archive, name, bicycle, bus = shared_name
    out = tmp_path / "out"
    summary = etl.stage(archive, out, ["bicycle", "motorcycle"], extra_classes=["bus"], progress=False)

    kept, renamed = f"train/{name}", f"train/{name.removesuffix('.png')}.bus.png"
    assert etl.SAFE_IMAGE_NAME.fullmatch(Path(renamed).name)
    assert summary.dataset["renamed"] == [{"name": name, "staged_as": renamed, "class": "bus"}]
    assert json.loads((out / "dataset.json").read_text())["renamed"] == summary.dataset["renamed"]
    for path, row in ((kept, bicycle), (renamed, bus)):
        assert np.array_equal(decoded(out / path), pixels_from_row(cifar["train"][b"data"][row]))
        assert path in summary.dataset["files"]
    listed = {path: label for lst in ("train.lst", "validation.lst") for _, label, path in manifest(out, lst)}
    assert (listed[kept], listed[renamed]) == (0, 2)
    assert len(listed) == sum(sum(summary.dataset["counts"][split].values()) for split in ("train", "validation")) == 30
    assert sorted(staged_files(out)) == sorted([*summary.dataset["files"], "dataset.json"])

    again = etl.stage(archive, out, ["bicycle", "motorcycle"], extra_classes=["bus"], progress=False)
    assert again.written == [] and again.dataset == summary.dataset


def test_a_shared_name_among_classes_not_staged_needs_nothing(tmp_path, shared_name):
    archive, name, _, _ = shared_name
    for classes in (["bicycle"], ["bus"]):
        summary = etl.stage(archive, tmp_path / classes[0], classes, progress=False)
        assert "renamed" not in summary.dataset
        assert f"train/{name}" in summary.dataset["files"]


def test_a_renamed_image_that_meets_another_name_is_refused(tmp_path, cifar, shared_name):
    archive, name, _, bus = shared_name
    later = next(row for row in rows_of(cifar["train"], "motorcycle") if row > bus)
    cifar["train"][b"filenames"][bus] = name.encode()
    cifar["train"][b"filenames"][later] = f"{name.removesuffix('.png')}.bus.png".encode()
    clash = write_archive(tmp_path / "clash.tar.gz", cifar_members(cifar))
    with pytest.raises(etl.CorruptArchive, match=f"more than one image named train/{re.escape(name[:-4])}.bus.png$"):
        etl.stage(clash, tmp_path / "out", TINY_CLASSES, progress=False)


def test_command_prints_each_renamed_image(tmp_path, shared_name, capsys):
    archive, name, _, _ = shared_name
    assert etl.main(["--source", str(archive), "--out", str(tmp_path / "out"), "--classes", "bicycle,bus"]) == 0
    assert capsys.readouterr().err == (
        f"renamed {name} of class bus to train/{name[:-4]}.bus.png: an image of another class has that name first\n"
    )


def test_a_truncated_archive_is_corrupt(tmp_path, archive):
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(etl.CorruptArchive, match="truncated.tar.gz is not a readable CIFAR-100 archive"):
        etl.stage(truncated, tmp_path / "out", progress=False)


def test_an_archive_without_the_train_member_is_corrupt(tmp_path, cifar):
    members = cifar_members(cifar)
    members.pop("cifar-100-python/train")
    partial = write_archive(tmp_path / "partial.tar.gz", members)
    with pytest.raises(etl.CorruptArchive, match="it has no cifar-100-python/train$"):
        etl.read_archive(partial)


# ----------------------------------------------------------------------------------------- staging


def test_stage_writes_exact_images_manifests_and_dataset(tmp_path, archive, cifar):
    out = tmp_path / "out"
    classes = ["motorcycle", "bicycle"]
    summary = etl.stage(archive, out, classes, validation_fraction=0.2, progress=False)

    rows_by_path = {
        f"{folder}/{filename.decode()}": (row, TINY_NAMES[fine_label])
        for folder, split in (("train", cifar["train"]), ("test", cifar["test"]))
        for filename, fine_label, row in zip(split[b"filenames"], split[b"fine_labels"], split[b"data"], strict=True)
    }
    lists = {name: manifest(out, name) for name in ("train.lst", "validation.lst", "test.lst")}
    for rows in lists.values():
        assert [index for index, _, _ in rows] == list(range(len(rows)))
        for _, label, path in rows:
            assert classes[label] == rows_by_path[path][1]
            assert np.array_equal(decoded(out / path), pixels_from_row(rows_by_path[path][0]))
    expected_train = {path for path, (_, name) in rows_by_path.items() if path.startswith("train/") and name in classes}
    listed_train = [path for name in ("train.lst", "validation.lst") for _, _, path in lists[name]]
    assert sorted(listed_train) == sorted(expected_train)
    assert {path for _, _, path in lists["test.lst"]} == {
        path for path, (_, name) in rows_by_path.items() if path.startswith("test/") and name in classes
    }

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset == summary.dataset
    assert dataset["classes"] == [
        {"name": "motorcycle", "label": 0, "cifar_fine_label": 3},
        {"name": "bicycle", "label": 1, "cifar_fine_label": 1},
    ]
    assert dataset["source"] == {"name": archive.name, "sha256": sha256(archive)}
    assert dataset["counts"] == {
        name.removesuffix(".lst"): {cls: sum(classes[label] == cls for _, label, _ in rows) for cls in classes}
        for name, rows in lists.items()
    }
    assert dataset["counts"]["validation"] == {"motorcycle": 2, "bicycle": 2}
    assert dataset["files"] == {
        path.relative_to(out).as_posix(): sha256(path)
        for path in out.rglob("*")
        if path.is_file() and path.name != "dataset.json"
    }
    train_pixels = np.stack([rows_by_path[path][0] for _, _, path in lists["train.lst"]]).astype(np.float64) / 255
    channels = [train_pixels[:, channel * 1024 : (channel + 1) * 1024] for channel in range(3)]
    assert dataset["pixel_stats"]["mean"] == pytest.approx([channel.mean() for channel in channels], rel=1e-12)
    assert dataset["pixel_stats"]["std"] == pytest.approx([channel.std() for channel in channels], rel=1e-12)
    assert sorted(summary.written) == sorted(staged_files(out))


def test_extra_classes_are_staged_for_training_only(tmp_path, archive):
    out = tmp_path / "out"
    summary = etl.stage(archive, out, ["bicycle", "motorcycle"], extra_classes=["bus"], progress=False)
    lists = {name: manifest(out, name) for name in ("train.lst", "validation.lst", "test.lst")}
    assert {label for _, label, _ in lists["train.lst"] + lists["validation.lst"]} == {0, 1, 2}
    assert {label for _, label, _ in lists["test.lst"]} == {0, 1}
    assert all("bus" not in path.name for path in (out / "test").iterdir())
    assert any("bus" in path for _, label, path in lists["train.lst"] if label == 2)
    assert [c["name"] for c in summary.dataset["classes"]] == ["bicycle", "motorcycle"]
    assert summary.dataset["extra_classes"] == [{"name": "bus", "label": 2, "cifar_fine_label": 2}]
    assert summary.dataset["counts"]["test"]["bus"] == 0 < summary.dataset["counts"]["train"]["bus"]


def test_png_bytes_and_the_split_are_the_same_every_run_and_follow_the_seed(tmp_path, archive):
    first, again, other_seed = (
        etl.stage(archive, tmp_path / name, TINY_CLASSES, seed=seed, progress=False)
        for name, seed in (("first", 0), ("again", 0), ("other-seed", 1))
    )
    assert first.dataset == again.dataset
    assert (tmp_path / "first/validation.lst").read_bytes() == (tmp_path / "again/validation.lst").read_bytes()
    assert manifest(tmp_path / "first", "validation.lst") != manifest(tmp_path / "other-seed", "validation.lst")
    assert other_seed.dataset["counts"]["validation"] == first.dataset["counts"]["validation"]


def test_unknown_class_lists_the_valid_names(tmp_path, archive):
    with pytest.raises(etl.UnknownClass) as raised:
        etl.stage(archive, tmp_path / "out", ["bicycle", "unicycle"], progress=False)
    assert str(raised.value) == f"unknown class unicycle; the CIFAR-100 classes are {', '.join(TINY_NAMES)}"


def test_class_without_images_fails_naming_the_classes_present(tmp_path, archive):
    with pytest.raises(etl.MissingClass) as raised:
        etl.stage(archive, tmp_path / "out", ["bicycle", "rocket"], progress=False)
    assert str(raised.value) == f"{archive.name} has no train images of rocket; it has bicycle, bus, motorcycle"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"classes": ["bus", "bus"]}, "classes and extra classes must be distinct"),
        ({"extra_classes": ["bicycle"]}, "classes and extra classes must be distinct"),
        ({"validation_fraction": 1.0}, "validation fraction must be at least 0 and below 1"),
    ],
)
def test_invalid_options_fail(tmp_path, archive, options, message):
    with pytest.raises(etl.InvalidOption, match=message):
        etl.stage(archive, tmp_path / "out", **{"classes": TINY_CLASSES, "progress": False, **options})


def test_a_second_run_writes_nothing(tmp_path, archive):
    out = tmp_path / "out"
    first = etl.stage(archive, out, TINY_CLASSES, progress=False)
    before = staged_files(out)
    second = etl.stage(archive, out, TINY_CLASSES, progress=False)
    assert first.written and second.written == []
    assert staged_files(out) == before
    assert second.report() == f"nothing new: {len(before)} files already staged in {out}"


def test_an_interrupted_run_leaves_only_whole_files_and_the_next_run_completes_it(tmp_path, archive, monkeypatch):
    reference = etl.stage(archive, tmp_path / "reference", TINY_CLASSES, progress=False)
    out = tmp_path / "out"

    class Killed(BaseException):
        pass

    replace, lock, replaced = os.replace, threading.Lock(), []

    def replace_then_die(source, destination):
        with lock:
            if len(replaced) == 5:
                raise Killed()
            replaced.append(destination)
        replace(source, destination)

    monkeypatch.setattr(etl.os, "replace", replace_then_die)
    with pytest.raises(Killed):
        etl.stage(archive, out, TINY_CLASSES, progress=False)
    monkeypatch.undo()

    left = staged_files(out)
    final_files = [name for name in left if not Path(name).name.startswith(".")]
    assert len(final_files) == 5 and "dataset.json" not in final_files
    assert [name for name in left if name.endswith(".tmp")]
    assert all(sha256(out / name) == reference.dataset["files"][name] for name in final_files)

    completed = etl.stage(archive, out, TINY_CLASSES, progress=False)
    assert completed.dataset == reference.dataset
    assert sorted(staged_files(out)) == sorted([*reference.dataset["files"], "dataset.json"])
    assert sorted(completed.written) == sorted(set(staged_files(out)) - set(final_files))


def test_a_partial_folder_is_completed(tmp_path, archive):
    out = tmp_path / "out"
    first = etl.stage(archive, out, TINY_CLASSES, progress=False)
    missing, damaged = sorted(name for name in first.dataset["files"] if name.startswith("train/"))[:2]
    (out / missing).unlink()
    (out / damaged).write_bytes(b"half a png")
    (out / "dataset.json").unlink()
    stray = out / "train" / f".{Path(missing).name}.12345.tmp"
    stray.write_bytes(b"half a png")

    second = etl.stage(archive, out, TINY_CLASSES, progress=False)
    assert sorted(second.written) == sorted([missing, damaged, "dataset.json"])
    assert not stray.exists()
    assert second.dataset == first.dataset
    assert all(sha256(out / name) == digest for name, digest in first.dataset["files"].items())


# ------------------------------------------------------------------------------------------ source


@pytest.fixture
def no_source_configured(tmp_path, monkeypatch):
    monkeypatch.delenv("SCONES_CIFAR100", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "scones" / etl.ARCHIVE_NAME


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def web_server(tmp_path):
    """A folder served over HTTP on 127.0.0.1, and its URL."""
    folder = tmp_path / "web"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def closed_port_url() -> str:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{unused.getsockname()[1]}/{etl.ARCHIVE_NAME}"


def test_missing_source_path(tmp_path):
    with pytest.raises(etl.SourceNotFound, match=f"^no archive at {re.escape(str(tmp_path / 'absent.tar.gz'))}$"):
        etl.stage(tmp_path / "absent.tar.gz", tmp_path / "out", progress=False)


def test_the_environment_variable_names_the_source(tmp_path, archive, no_source_configured, monkeypatch):
    monkeypatch.setenv("SCONES_CIFAR100", str(archive))
    assert etl.stage(None, tmp_path / "out", TINY_CLASSES, progress=False).dataset["source"]["name"] == archive.name


def test_offline_without_a_source_says_how_to_give_one(tmp_path, no_source_configured, monkeypatch):
    monkeypatch.setattr("training.cifar.OFFICIAL_URL", closed_port_url())
    with pytest.raises(etl.DownloadFailed) as raised:
        etl.stage(None, tmp_path / "out", progress=False)
    assert "--source PATH or SCONES_CIFAR100=PATH" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert list(no_source_configured.parent.iterdir()) == []


def test_a_download_is_checked_cached_and_then_used_offline(
    tmp_path, archive, no_source_configured, web_server, monkeypatch
):
    folder, url = web_server
    (folder / etl.ARCHIVE_NAME).write_bytes(archive.read_bytes())
    monkeypatch.setattr("training.cifar.OFFICIAL_URL", f"{url}/{etl.ARCHIVE_NAME}")
    monkeypatch.setattr("training.cifar.OFFICIAL_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    downloaded = etl.stage(None, tmp_path / "out", TINY_CLASSES, progress=False)
    assert no_source_configured.read_bytes() == archive.read_bytes()
    assert downloaded.dataset["source"] == {"name": etl.ARCHIVE_NAME, "sha256": sha256(archive)}

    monkeypatch.setattr("training.cifar.OFFICIAL_URL", closed_port_url())
    assert etl.stage(None, tmp_path / "out", TINY_CLASSES, progress=False).written == []


def test_a_download_with_the_wrong_md5_is_not_kept(tmp_path, archive, no_source_configured, web_server):
    folder, url = web_server
    (folder / "other.tar.gz").write_bytes(archive.read_bytes())
    with pytest.raises(
        etl.ChecksumMismatch,
        match=f"has MD5 {hashlib.md5(archive.read_bytes()).hexdigest()}, not the official archive's {OFFICIAL_MD5}",
    ):
        etl.stage(f"{url}/other.tar.gz", tmp_path / "out", progress=False)
    assert list(no_source_configured.parent.iterdir()) == []


# -------------------------------------------------------------------------------------- shared copy


@pytest.fixture(scope="module")
def shared_staged(tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "out"
    summary = etl.stage(SHARED, out, ["bicycle", "motorcycle"], progress=False)
    with tarfile.open(SHARED) as tar:  # the trusted shared file, read with plain pickle as the reference
        reference = {
            name: pickle.load(tar.extractfile(f"cifar-100-python/{name}"), encoding="latin1")
            for name in ("meta", "train", "test")
        }
    return out, summary, reference


@needs_shared
def test_shared_copy_reads_the_same_with_both_pickle_encodings():
    as_bytes, as_latin1 = (etl.read_archive(SHARED, encoding=encoding) for encoding in ("bytes", "latin1"))
    assert as_bytes.fine_label_names == as_latin1.fine_label_names and len(as_bytes.fine_label_names) == 100
    for split_bytes, split_latin1 in ((as_bytes.train, as_latin1.train), (as_bytes.test, as_latin1.test)):
        assert split_bytes.filenames == split_latin1.filenames and isinstance(split_bytes.filenames[0], str)
        assert np.array_equal(split_bytes.fine_labels, split_latin1.fine_labels)
        assert np.array_equal(split_bytes.data, split_latin1.data)


@needs_shared
def test_shared_copy_gives_the_expected_counts(shared_staged):
    out, summary, _ = shared_staged
    lists = {name: manifest(out, name) for name in ("train.lst", "validation.lst", "test.lst")}
    assert {name: len(rows) for name, rows in lists.items()} == {
        "train.lst": 900,
        "validation.lst": 100,
        "test.lst": 100,
    }
    assert len(list((out / "train").iterdir())) == 1000 and len(list((out / "test").iterdir())) == 100
    for name, per_label in (("train.lst", 450), ("validation.lst", 50), ("test.lst", 50)):
        assert [sum(label == wanted for _, label, _ in lists[name]) for wanted in (0, 1)] == [per_label, per_label]
    assert not {path for _, _, path in lists["train.lst"]} & {path for _, _, path in lists["validation.lst"]}
    assert summary.dataset["counts"]["validation"] == {"bicycle": 50, "motorcycle": 50}


@needs_shared
def test_shared_copy_labels_and_pixels_match_the_archive(shared_staged):
    out, _, reference = shared_staged
    names = reference["meta"]["fine_label_names"]
    for name in ("train.lst", "validation.lst", "test.lst"):
        split = reference["test" if name == "test.lst" else "train"]
        fine_label_of = dict(zip(split["filenames"], split["fine_labels"], strict=True))
        for _, label, path in manifest(out, name):
            assert ["bicycle", "motorcycle"][label] == names[fine_label_of[path.split("/")[1]]]

    train, test = reference["train"], reference["test"]
    first_bicycle = train["fine_labels"].index(names.index("bicycle"))
    first_motorcycle = train["fine_labels"].index(names.index("motorcycle"))
    last_test = max(index for index, label in enumerate(test["fine_labels"]) if names[label] == "bicycle")
    for folder, split, index in (
        ("train", train, first_bicycle),
        ("train", train, first_motorcycle),
        ("test", test, last_test),
    ):
        assert np.array_equal(decoded(out / folder / split["filenames"][index]), pixels_from_row(split["data"][index]))


@needs_subset
@pytest.mark.parametrize(
    "classes, extra_classes", [(["bicycle", "motorcycle"], ["baby", "girl"]), (["girl", "baby"], [])]
)
def test_the_subset_stages_baby_and_girl_despite_their_shared_names(tmp_path, classes, extra_classes):
    """The official archive names a training and a test image twice, once as girl and, later, once as baby."""
    out = tmp_path / "out"
    summary = etl.stage(SUBSET, out, classes, extra_classes=extra_classes, progress=False)
    folders = ["train"] + ["test"] * (not extra_classes)
    number = {"train": "000333", "test": "000223"}
    assert summary.dataset["renamed"] == [
        {
            "name": f"baby_s_{number[folder]}.png",
            "staged_as": f"{folder}/baby_s_{number[folder]}.baby.png",
            "class": "baby",
        }
        for folder in folders
    ]
    archive = etl.read_archive(SUBSET)
    label_of = {"baby": (classes + extra_classes).index("baby"), "girl": (classes + extra_classes).index("girl")}
    listed = {
        path: label for lst in ("train.lst", "validation.lst", "test.lst") for _, label, path in manifest(out, lst)
    }
    for folder in folders:
        split = getattr(archive, folder)
        rows = [row for row, name in enumerate(split.filenames) if name == f"baby_s_{number[folder]}.png"]
        assert [archive.fine_label_names[split.fine_labels[row]] for row in rows] == ["girl", "baby"]
        for row, path in zip(rows, [f"baby_s_{number[folder]}.png", f"baby_s_{number[folder]}.baby.png"], strict=True):
            assert np.array_equal(decoded(out / folder / path), pixels_from_row(split.data[row]))
        assert listed[f"{folder}/baby_s_{number[folder]}.png"] == label_of["girl"]
        assert listed[f"{folder}/baby_s_{number[folder]}.baby.png"] == label_of["baby"]


# ---------------------------------------------------------------------------------------------- S3


def test_upload_puts_every_file_with_its_sha256_and_only_once(tmp_path, archive, s3):
    out = tmp_path / "out"
    first = etl.stage(archive, out, TINY_CLASSES, bucket="scones-data", progress=False)
    local = {path.relative_to(out).as_posix(): path for path in out.rglob("*") if path.is_file()}
    objects = s3.list_objects_v2(Bucket="scones-data")["Contents"]
    assert sorted(item["Key"] for item in objects) == sorted(local) == sorted(first.uploaded)
    for key, path in local.items():
        head = s3.head_object(Bucket="scones-data", Key=key)
        assert head["Metadata"] == {"sha256": sha256(path)}
        assert (
            head["ContentType"] == {".png": "image/png", ".lst": "text/plain", ".json": "application/json"}[path.suffix]
        )
    assert s3.get_object(Bucket="scones-data", Key="test.lst")["Body"].read() == (out / "test.lst").read_bytes()

    puts = []
    s3.meta.events.register("provide-client-params.s3.PutObject", lambda params, **_: puts.append(params["Key"]))
    second = etl.stage(archive, out, TINY_CLASSES, bucket="scones-data", progress=False, s3_client=s3)
    assert (second.uploaded, puts) == ([], [])
    assert second.report().splitlines()[1] == f"nothing new: {len(local)} files already in s3://scones-data"

    stale = sorted(local)[0]
    s3.put_object(Bucket="scones-data", Key=stale, Body=b"old", Metadata={"sha256": "old"})
    puts.clear()
    third = etl.stage(archive, out, TINY_CLASSES, bucket="scones-data", progress=False, s3_client=s3)
    assert third.uploaded == puts == [stale]
    assert s3.get_object(Bucket="scones-data", Key=stale)["Body"].read() == local[stale].read_bytes()


def test_upload_to_a_missing_bucket_fails_in_one_line(tmp_path, archive, s3):
    with pytest.raises(etl.UploadFailed, match="^cannot upload to s3://absent-bucket: .*NoSuchBucket[^\n]*$"):
        etl.stage(archive, tmp_path / "out", TINY_CLASSES, bucket="absent-bucket", progress=False)


# ------------------------------------------------------------------------------------- command line


def test_command_reports_what_it_staged(tmp_path, archive, capsys):
    arguments = ["--source", str(archive), "--out", str(tmp_path / "out"), "--classes", "bicycle,bus"]
    assert etl.main(arguments) == 0
    count = len(staged_files(tmp_path / "out"))
    assert capsys.readouterr().out == f"staged {count} files in {tmp_path / 'out'} ({count} written)\n"
    assert etl.main(arguments) == 0
    assert capsys.readouterr().out == f"nothing new: {count} files already staged in {tmp_path / 'out'}\n"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--source", "{tmp}/absent.tar.gz"], "error: no archive at {tmp}/absent.tar.gz"),
        (["--source", "{archive}", "--classes", "bicycle,unicycle"], "error: unknown class unicycle; the CIFAR-100"),
        (["--source", "{archive}", "--classes", "bicycle,rocket"], "error: tiny-cifar.tar.gz has no train images of"),
        (["--source", "{archive}", "--validation-fraction", "1"], "error: the validation fraction must be at least 0"),
        (["--source", "{truncated}"], "error: truncated.tar.gz is not a readable CIFAR-100 archive: ReadError"),
    ],
)
def test_command_errors_are_one_line_with_exit_code_2(tmp_path, archive, capsys, arguments, message):
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:1000])
    arguments = [argument.format(tmp=tmp_path, archive=archive, truncated=truncated) for argument in arguments]
    assert etl.main([*arguments, "--out", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith(message.format(tmp=tmp_path))


def test_module_runs_as_a_command(tmp_path, archive):
    def run(*arguments):
        return subprocess.run(
            [sys.executable, "-m", "training.etl", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=60
        )

    helped = run("--help")
    assert helped.returncode == 0 and "--source PATH|URL" in helped.stdout
    failed = run("--source", str(archive), "--out", str(tmp_path / "out"), "--classes", "unicycle")
    assert failed.returncode == 2
    assert failed.stderr.splitlines() == [failed.stderr.strip()] and failed.stderr.startswith("error: unknown class")
