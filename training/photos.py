"""Stage a company's own labelled photos beside the CIFAR images (`python -m training.etl --photos`).

The source is a folder or an S3 prefix holding one subfolder per class (`bicycle/`, `motorcycle/`, `neither/`,
or any class staged from CIFAR), as reviewed photos land under `s3://<bucket>/labels/<class>/<key>`. Each photo
is checked by decoding it, then staged with its original bytes as `train/photo-<sha>.<ext>`: the first 16 hex
digits of the SHA-256 of its bytes and the extension of its format. Naming by content makes a photo's file
independent of its label and name (relabelling or renaming one rewrites only the manifests) and puts it where
the training job's `train` channel (the S3 prefix `train`) and the training script's lookup of CIFAR images
already find it. The split is a hash of the seed and the photo's SHA-256: adding photos moves no other photo.
"""

import hashlib
import io
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

NEITHER = "neither"
# The object the training state machine keeps at s3://<bucket>/labels/.keep, so that the training job's labels
# channel is never empty (SageMaker refuses a channel without objects): no photo, and not listed as skipped.
MARKER = ".keep"
# What phones and cameras write that Pillow decodes without outside programs; a JPEG with a second picture
# inside opens as MPO. Other formats are refused rather than opened: EPS, for instance, runs Ghostscript.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif"}
# A photo the endpoint would refuse (training.inference.MAX_PIXELS) is not staged either. Written again here,
# not imported: inference.py imports torch, which would take the ETL's start from 0.5 s to 5 s.
MAX_PHOTO_PIXELS = 50_000_000
MAX_PHOTO_BYTES = 100 << 20
STAGED_PREFIX = "train/photo-"
READ_THREADS = 8
# Photos read ahead of the one being checked: bounds the memory a folder of large photos takes.
READ_AHEAD = 32


class PhotoError(Exception):
    """The photo source cannot be staged at all (missing, empty, unreachable); the message says why."""


@dataclass
class Entry:
    """A file of the source: its path below the source (`<class>/<name>`), size and a reader of its bytes."""

    path: str
    size: int
    read: Callable[[], bytes]


@dataclass
class PhotoSource:
    location: str
    entries: list[Entry]


@dataclass
class StagedPhotos:
    """What `stage` staged: manifest rows per split as (class, staged path), the SHA-256 of each staged file,
    the files written, and the `photos` section of dataset.json."""

    rows: dict[str, list[tuple[str, str]]]
    hashes: dict[str, str]
    written: list[str]
    section: dict


# ------------------------------------------------------------------------------------------ source


def find(source: str, s3_client=None) -> PhotoSource:
    """The files of a folder or an S3 prefix (`s3://bucket/prefix/`), in path order."""
    if str(source).startswith("s3://"):
        return find_in_s3(str(source), s3_client)
    root = Path(source).expanduser()
    if not root.exists():
        raise PhotoError(f"no photo folder at {root}")
    if not root.is_dir():
        raise PhotoError(f"{root} is a file; --photos takes a folder with a subfolder per class")
    entries = [
        Entry(path.relative_to(root).as_posix(), path.stat().st_size, path.read_bytes)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path != root / MARKER
    ]
    if not entries:
        raise PhotoError(f"{root} holds no files; it should hold a subfolder of photos per class")
    return PhotoSource(str(root.resolve()), entries)


def find_in_s3(uri: str, s3_client=None) -> PhotoSource:
    import boto3  # here, not at the top: importing boto3 takes longer than staging two classes
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise PhotoError(f"{uri} names no bucket; write s3://bucket/prefix/")
    prefix = prefix if not prefix or prefix.endswith("/") else f"{prefix}/"
    s3 = s3_client or boto3.client("s3")

    def reader(key: str) -> Callable[[], bytes]:
        def read() -> bytes:
            try:
                return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            except (BotoCoreError, ClientError) as error:  # the bucket's or the credentials' fault, not the photo's
                raise PhotoError(f"cannot read s3://{bucket}/{key}: {error}") from None

        return read

    try:
        entries = [
            Entry(item["Key"][len(prefix) :], item["Size"], reader(item["Key"]))
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])
            if not item["Key"].endswith("/") and item["Key"] != prefix + MARKER  # nor a "folder" made in the console
        ]
    except (BotoCoreError, ClientError) as error:
        raise PhotoError(f"cannot list s3://{bucket}/{prefix}: {error}") from None
    if not entries:
        raise PhotoError(f"s3://{bucket}/{prefix} holds no objects; it should hold <class>/<photo> keys")
    return PhotoSource(f"s3://{bucket}/{prefix}", entries)


# ------------------------------------------------------------------------------------------- check


def class_problem(path: str, classes: list[str]) -> str | None:
    folder, _, name = path.partition("/")
    folders = ", ".join(f"{name}/" for name in classes)
    if not name:
        return f"not in a class folder ({folders})"
    if folder not in classes:
        return f"folder {folder!r} is no class ({folders})"
    return None


def inspect(content: bytes) -> tuple[str, str | None]:
    """The extension to stage a photo under, and what makes it unfit to train on (None when nothing does).
    Decodes it whole, as training will, so that truncated or corrupt files are caught here."""
    try:
        with warnings.catch_warnings():  # the bomb warning: such images are refused below, without decoding
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(content), formats=PHOTO_FORMATS)
    except Image.DecompressionBombError:
        return "", f"more pixels than a camera makes (over {MAX_PHOTO_PIXELS // 1_000_000} megapixels)"
    except UnidentifiedImageError:
        return "", f"not an image in a photo format ({', '.join(PHOTO_FORMATS)})"
    except Exception as error:  # whatever else fails while parsing untrusted bytes makes them unusable
        return "", f"unreadable: {error}"
    with image:
        width, height = image.size
        if width * height > MAX_PHOTO_PIXELS:
            return (
                "",
                f"{width}x{height} pixels: more than a camera makes (over {MAX_PHOTO_PIXELS // 1_000_000} megapixels)",
            )
        try:
            image.getexif()  # training turns the photo by its EXIF orientation
            image.load()
        except Exception as error:
            return "", f"unreadable: {error}"
        return EXTENSIONS.get(image.format, f".{image.format.lower()}"), None


def in_validation(sha256: str, seed: int, fraction: float) -> bool:
    draw = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(draw[:8]) < fraction * 2**64


# ------------------------------------------------------------------------------------------- stage


def stage(
    source: PhotoSource,
    out: Path,
    classes: list[str],
    *,
    validation_fraction: float,
    seed: int,
    progress: bool = True,
) -> StagedPhotos:
    """Check every file of `source` and stage the photos of `classes` and of "neither" into `out`.

    A photo goes first to a temporary name and, once every file is read, to its final name: a photo whose very
    bytes also lie in another class's folder is then skipped, not staged."""
    classes = [*classes, NEITHER]
    skipped = []
    found: dict[str, list[tuple[str, str, Path | None]]] = {}  # SHA-256 -> (path, class, temporary file) of each copy
    staged_name = {}

    def read(entry: Entry) -> bytes | str:
        """The bytes of `entry`, or why they are not read."""
        problem = class_problem(entry.path, classes)
        if problem:
            return problem
        if entry.size > MAX_PHOTO_BYTES:
            return f"{entry.size / 2**20:.0f} MB: larger than a photo (at most {MAX_PHOTO_BYTES >> 20} MB)"
        try:
            return entry.read()
        except OSError as error:
            return f"unreadable: {error.strerror or error}"

    bar = tqdm(total=len(source.entries), desc="check photos", unit="photo", disable=not progress)
    with bar, ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(source.entries), READ_AHEAD):
            chunk = source.entries[start : start + READ_AHEAD]
            for entry, content in zip(chunk, pool.map(read, chunk), strict=True):
                bar.update()
                if isinstance(content, str):
                    skipped.append({"path": entry.path, "reason": content})
                    continue
                sha256 = hashlib.sha256(content).hexdigest()
                label = entry.path.partition("/")[0]
                if sha256 in found:
                    found[sha256].append((entry.path, label, None))
                    continue
                extension, problem = inspect(content)
                if problem:
                    skipped.append({"path": entry.path, "reason": problem})
                    continue
                staged_name[sha256] = f"{STAGED_PREFIX}{sha256[:16]}{extension}"
                found[sha256] = [(entry.path, label, write_temporary(out / staged_name[sha256], content))]

    rows = {"train": [], "validation": []}
    hashes, written, sources = {}, [], {}
    for sha256, copies in found.items():
        path, label, temporary = copies[0]
        labels = {label for _, label, _ in copies}
        if len(labels) > 1:
            skipped += [
                {"path": path, "reason": f"the same photo is labelled {' and '.join(sorted(labels))}"}
                for path, _, _ in copies
            ]
            if temporary:
                temporary.unlink()
            continue
        skipped += [{"path": other, "reason": f"the same photo as {path}, staged once"} for other, _, _ in copies[1:]]
        name = staged_name[sha256]
        if temporary:
            os.replace(temporary, out / name)
            written.append(name)
        hashes[name], sources[name] = sha256, path
        rows["validation" if in_validation(sha256, seed, validation_fraction) else "train"].append((label, name))

    for split_rows in rows.values():
        split_rows.sort(key=lambda row: (classes.index(row[0]), sources[row[1]]))
    section = {
        "source": source.location,
        "naming": f"{STAGED_PREFIX}<first 16 hex digits of the SHA-256 of its bytes>.<extension of its format>",
        "validation": {
            "fraction": validation_fraction,
            "seed": seed,
            "rule": "in validation when the first 8 bytes of SHA-256('<seed>:<photo's SHA-256>') / 2**64 < fraction",
        },
        "counts": {
            split: {name: sum(row[0] == name for row in split_rows) for name in classes}
            for split, split_rows in rows.items()
        },
        "staged": dict(sorted(sources.items())),
        "skipped": sorted(skipped, key=lambda item: item["path"]),
    }
    return StagedPhotos(rows, hashes, written, section)


def write_temporary(path: Path, content: bytes) -> Path | None:
    """`content` written beside `path` under a temporary name, or None when `path` has those bytes already."""
    try:
        if path.stat().st_size == len(content) and path.read_bytes() == content:
            return None
    except FileNotFoundError:
        pass
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(content)
    return temporary
