"""Stage CIFAR-100 images of chosen classes as PNG files with SageMaker `.lst` manifests.

    python -m training.etl --source ARCHIVE --out DIR [--bucket NAME] [--classes a,b,...]
                           [--extra-classes all|none|c,d,...] [--photos DIR|s3://BUCKET/PREFIX/]

The archive is the official CIFAR-100 python archive or a copy in its format (such as the shared
vehicles-only one). It is the first of: `--source PATH|URL`, `$SCONES_CIFAR100`, the cached copy
(`$XDG_CACHE_HOME/scones/cifar-100-python.tar.gz`, by default under `~/.cache`), a download of the
official archive. Downloads are checked against the official MD5 and cached, so a URL whose download
is already cached is not fetched again.

The output folder (and, with `--bucket`, the bucket root) gets `train/<cifar name>.png`,
`test/<cifar name>.png`, `train.lst`, `validation.lst`, `test.lst` and, last, `dataset.json`.
Validation images are a stratified, seeded part of the training images; they stay under `train/`.
The official archive gives a few names to images of two classes (baby_s_000333.png is a girl and a baby):
the first in archive order keeps the name, a later one is staged as `<cifar name minus .png>.<its
class>.png`, printed and listed in dataset.json under `renamed`.
Extra classes (by default every other class of the archive) are staged for training only (labels after the
classes', no test images): the default recipe learns them as "neither" (`--architecture resnet9`: as more outputs,
to sharpen its features), and serves only the classes.
Running again writes and uploads only what differs, and completes an interrupted run.

`--photos` adds a company's own labelled photos: a folder or S3 prefix with a subfolder per class (`bicycle/`,
`motorcycle/`, `neither/`, or another staged class), such as `s3://BUCKET/labels/` where reviewed photos land.
Each photo is decoded to check it and staged with its original bytes as `train/photo-<sha256>.<ext>`, listed in
train.lst or validation.lst by a hash of its bytes (adding photos moves no other photo). Photos of `neither/`
take the label after every other class; dataset.json names it among the extra classes. Files that are no photo
of a class (not an image, truncated, too large, outside a class folder) are printed, recorded in dataset.json
under `photos.skipped` and not staged.
"""

import argparse
import collections
import hashlib
import io
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from training import photos as photo_staging

# The archive (training/cifar.py) and the upload (training/upload.py) have their own modules; `X as X` re-exports
# the names that callers use from training.etl.
from training.cifar import (
    ARCHIVE_NAME as ARCHIVE_NAME,
    IMAGE_SIDE,
    SHARED_ARCHIVE as SHARED_ARCHIVE,
    SHARED_REAL_PHOTOS as SHARED_REAL_PHOTOS,
    SHARED_SUBSET_ARCHIVE as SHARED_SUBSET_ARCHIVE,
    ChecksumMismatch as ChecksumMismatch,
    Cifar100,
    CorruptArchive as CorruptArchive,
    DownloadFailed as DownloadFailed,
    EtlError as EtlError,
    SourceNotFound as SourceNotFound,
    Split,
    UnsafeArchive as UnsafeArchive,
    read_archive as read_archive,
    resolve_source,
    sha256_of_file as sha256_of_file,
)
from training.upload import (
    CONTENT_TYPES as CONTENT_TYPES,
    UploadFailed as UploadFailed,
    upload,
)

DEFAULT_CLASSES = ("bicycle", "motorcycle")
# The archive's other vehicle classes: what `make run` staged for the 32-px network (`--architecture resnet9`),
# which learns them alongside bicycle and motorcycle to sharpen its features.
VEHICLE_EXTRA_CLASSES = ("bus", "lawn_mower", "pickup_truck", "rocket", "streetcar", "tank", "tractor", "train")
# extra_classes: every class of the archive with training images besides the targets. The default recipe learns
# them as "neither" (at most --neither_per_class images of each).
ALL_OTHERS = "all"
DEFAULT_VALIDATION_FRACTION = 0.1
# Pillow writes no timestamps, so the bytes are the same every run. Level 1 is the fastest that compresses
# (28% smaller than level 0, which encodes twice as fast; 6 and 9 are slower and barely smaller: bench/etl.py).
PNG_COMPRESS_LEVEL = 1
WRITE_THREADS = 4
DATASET_FILE = "dataset.json"
IMAGE_FOLDERS = {"train": "train", "validation": "train", "test": "test"}
SAFE_IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.png")


class UnknownClass(EtlError):
    """A class name that CIFAR-100 does not have."""


class MissingClass(EtlError):
    """A CIFAR-100 class with no images in the archive."""


class InvalidOption(EtlError):
    """An option out of its range, e.g. a repeated class or a validation fraction of 1."""


class BadPhotoSource(EtlError):
    """The --photos folder or prefix is missing, empty or unreadable."""


# ------------------------------------------------------------------------------------------ output


@dataclass
class StageSummary:
    """What a run staged; `dataset` is the content of dataset.json."""

    out: Path
    dataset: dict
    written: list[str]
    bucket: str | None = None
    uploaded: list[str] = field(default_factory=list)

    @property
    def file_count(self) -> int:
        return len(self.dataset["files"]) + 1

    def report(self) -> str:
        if self.written:
            lines = [f"staged {self.file_count} files in {self.out} ({len(self.written)} written)"]
        else:
            lines = [f"nothing new: {self.file_count} files already staged in {self.out}"]
        if "photos" in self.dataset:
            photos = self.dataset["photos"]
            staged = {split: sum(counts.values()) for split, counts in photos["counts"].items()}
            lines.append(
                f"photos from {photos['source']}: {staged['train']} for training, {staged['validation']} for "
                f"validation, {len(photos['skipped'])} skipped (listed in {DATASET_FILE} under photos.skipped)"
            )
        if self.bucket and self.uploaded:
            lines.append(f"uploaded {len(self.uploaded)} of {self.file_count} files to s3://{self.bucket}")
        elif self.bucket:
            lines.append(f"nothing new: {self.file_count} files already in s3://{self.bucket}")
        return "\n".join(lines)


def demo_source() -> Path | None:
    """The archive `make run` and the benchmarks stage: $SCONES_CIFAR100, else the copy beside the checkout with
    the non-vehicle classes, else the vehicles one, else None (the cached copy or the download)."""
    if os.environ.get("SCONES_CIFAR100"):
        return Path(os.environ["SCONES_CIFAR100"])
    return next((path for path in (SHARED_SUBSET_ARCHIVE, SHARED_ARCHIVE) if path.is_file()), None)


def stage(
    source: str | os.PathLike | None,
    out: str | os.PathLike,
    classes=DEFAULT_CLASSES,
    bucket: str | None = None,
    *,
    extra_classes=(),
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
    progress: bool = True,
    s3_client=None,
    photos: str | os.PathLike | None = None,
) -> StageSummary:
    """Stage the images of `classes` (labels 0..n-1 in that order) and the training images of `extra_classes`
    (labels n.., no test images; ALL_OTHERS: every other class the archive has) from the archive `source` into the
    folder `out` and, with `bucket`, to the root of that S3 bucket (through `s3_client`, by default a new boto3
    one). `photos`, a folder or an `s3://` prefix, adds labelled photos for training and validation (see
    training/photos.py)."""
    every_other = extra_classes == ALL_OTHERS
    targets, classes = list(classes), list(classes) + ([] if every_other else list(extra_classes))
    if not targets or len(set(classes)) != len(classes) or "" in classes:
        raise InvalidOption(f"classes and extra classes must be distinct, non-empty names; got {','.join(classes)!r}")
    if not 0 <= validation_fraction < 1:
        raise InvalidOption(f"the validation fraction must be at least 0 and below 1; got {validation_fraction}")
    archive_path = resolve_source(source, progress)
    archive = read_archive(archive_path, progress=progress)
    if every_other:
        present = set(np.unique(archive.train.fine_labels).tolist())
        classes += [
            name for fine, name in enumerate(archive.fine_label_names) if fine in present and name not in targets
        ]
    fine_ids = fine_label_ids(classes, archive, archive_path)
    splits = split_rows(archive, fine_ids, fine_ids[: len(targets)], validation_fraction, seed)
    paths, renamed = staged_paths(splits, archive.fine_label_names, archive_path)
    images = image_files(splits, paths)
    try:
        photo_source = photo_staging.find(photos, s3_client) if photos else None
    except photo_staging.PhotoError as error:
        raise BadPhotoSource(str(error)) from None

    out = Path(out)
    for folder in (out, out / "train", out / "test"):
        folder.mkdir(parents=True, exist_ok=True)
        for stray in folder.glob(".*.tmp"):  # left by an interrupted run
            stray.unlink()
    hashes, written = write_images(out, images, progress)
    label_of = {fine_id: label for label, fine_id in enumerate(fine_ids)}
    listed = {
        split_name: [
            (label_of[split.fine_labels[row]], path) for row, path in zip(rows, paths[split_name], strict=True)
        ]
        for split_name, (split, rows) in splits.items()
    }
    counts = {
        split_name: {
            name: int(np.count_nonzero(split.fine_labels[rows] == fine_id))
            for name, fine_id in zip(classes, fine_ids, strict=True)
        }
        for split_name, (split, rows) in splits.items()
    }
    staged_photos = None
    if photo_source:
        try:
            staged_photos = photo_staging.stage(
                photo_source, out, classes, validation_fraction=validation_fraction, seed=seed, progress=progress
            )
        except photo_staging.PhotoError as error:
            raise BadPhotoSource(str(error)) from None
        hashes.update(staged_photos.hashes)
        written += staged_photos.written
        photo_counts = staged_photos.section["counts"]
        # "neither" is a label only once a photo has it: after all the others, so that no label moves.
        with_neither = classes + [photo_staging.NEITHER] * any(split["neither"] for split in photo_counts.values())
        for split_name, rows in staged_photos.rows.items():
            listed[split_name] += [(with_neither.index(name), path) for name, path in rows]
        for split_name, split_counts in counts.items():
            for name in with_neither:
                split_counts[name] = split_counts.get(name, 0) + photo_counts.get(split_name, {}).get(name, 0)
    for split_name, lines in listed.items():
        name, content = f"{split_name}.lst", manifest(lines)
        hashes[name] = hashlib.sha256(content).hexdigest()
        written += [name] if write_file(out / name, content) else []

    train, train_rows = splits["train"]
    dataset = {
        "source": {"name": archive_path.name, "sha256": sha256_of_file(archive_path)},
        "classes": [
            {"name": name, "label": label, "cifar_fine_label": fine_id}
            for label, (name, fine_id) in enumerate(zip(targets, fine_ids, strict=False))
        ],
        "extra_classes": [
            {"name": name, "label": label, "cifar_fine_label": fine_id}
            for label, (name, fine_id) in enumerate(zip(classes, fine_ids, strict=True))
            if label >= len(targets)
        ],
        "validation": {"fraction": validation_fraction, "seed": seed},
        "counts": counts,
        "pixel_stats": {"of": "train", "scale": "0..1", **channel_stats(train.data[train_rows])},
        "files": dict(sorted(hashes.items())),
    }
    if renamed:
        dataset["renamed"] = renamed
    if staged_photos:
        if photo_staging.NEITHER in counts["train"]:
            dataset["extra_classes"].append(
                {"name": photo_staging.NEITHER, "label": len(classes), "cifar_fine_label": None}
            )
        dataset["photos"] = staged_photos.section
    content = (json.dumps(dataset, indent=2) + "\n").encode()
    written += [DATASET_FILE] if write_file(out / DATASET_FILE, content) else []
    summary = StageSummary(out, dataset, written, bucket)
    if bucket:
        hashes[DATASET_FILE] = hashlib.sha256(content).hexdigest()
        summary.uploaded = upload(
            out, hashes, bucket, s3_client, progress, folders=IMAGE_FOLDERS.values(), last=DATASET_FILE
        )
    return summary


def fine_label_ids(classes: list[str], archive: Cifar100, archive_path: Path) -> list[int]:
    names = archive.fine_label_names
    unknown = [name for name in classes if name not in names]
    if unknown:
        raise UnknownClass(f"unknown class {', '.join(unknown)}; the CIFAR-100 classes are {', '.join(names)}")
    fine_ids = [names.index(name) for name in classes]
    for split_name, split in (("train", archive.train), ("test", archive.test)):
        present = set(split.fine_labels.tolist())
        absent = [name for name, fine_id in zip(classes, fine_ids, strict=True) if fine_id not in present]
        if absent:
            raise MissingClass(
                f"{archive_path.name} has no {split_name} images of {', '.join(absent)}; it has "
                f"{', '.join(names[fine_id] for fine_id in sorted(present))}"
            )
    return fine_ids


def split_rows(
    archive: Cifar100, fine_ids: list[int], test_ids: list[int], validation_fraction: float, seed: int
) -> dict[str, tuple[Split, np.ndarray]]:
    """For "train", "validation" and "test": the archive split holding the images of the classes and their
    row numbers in it, in archive order. Validation takes `validation_fraction` of each class's training
    rows, drawn with `seed`; "train" is the rest; "test" has only the classes of `test_ids`."""
    random = np.random.default_rng(seed)
    validation = []
    for fine_id in fine_ids:
        rows = np.flatnonzero(archive.train.fine_labels == fine_id)
        validation.append(random.permutation(rows)[: round(validation_fraction * len(rows))])
    validation = np.sort(np.concatenate(validation))
    train = np.setdiff1d(np.flatnonzero(np.isin(archive.train.fine_labels, fine_ids)), validation)
    return {
        "train": (archive.train, train),
        "validation": (archive.train, validation),
        "test": (archive.test, np.flatnonzero(np.isin(archive.test.fine_labels, test_ids))),
    }


def image_files(
    splits: dict[str, tuple[Split, np.ndarray]], paths: dict[str, list[str]] | None = None
) -> list[tuple[str, np.ndarray]]:
    """The relative path and CIFAR row of every image of the splits; the paths are `paths` (from
    `staged_paths`), by default `<folder>/<cifar name>`."""
    return [
        (paths[split_name][index] if paths else f"{IMAGE_FOLDERS[split_name]}/{split.filenames[row]}", split.data[row])
        for split_name, (split, rows) in splits.items()
        for index, row in enumerate(rows)
    ]


def manifest(lines: list[tuple[int, str]]) -> bytes:
    """SageMaker's `.lst` form: `index<TAB>label<TAB>relative/path`, a line per (label, path)."""
    return "".join(f"{index}\t{label}\t{path}\n" for index, (label, path) in enumerate(lines)).encode()


def staged_paths(
    splits: dict[str, tuple[Split, np.ndarray]], class_names: list[str], archive_path: Path
) -> tuple[dict[str, list[str]], list[dict]]:
    """Where each image of the splits is staged (per split, a relative path per row) and the images renamed.

    The archive names the images, and each name must be a plain file name. The first image with a name (in
    archive order, among the staged images of its folder) is staged under it; a later image of another class
    with the same name is staged as `<name>.<its class>.png` (an image may be staged twice, once per label): the
    official archive itself names train/baby_s_000333.png and test/baby_s_000223.png twice, each time the same
    pixels labelled girl and then baby. Two images of one class with one name are refused, even with the same
    pixels: CIFAR-100 has none, so they mean a tampered or mis-built archive, to be noticed rather than repaired
    in silence (dropping one would also make the staged counts differ from the archive's)."""
    staged = {}  # (folder, row) -> relative path
    renamed = []
    for folder in dict.fromkeys(IMAGE_FOLDERS.values()):
        in_folder = [
            (split, rows) for split_name, (split, rows) in splits.items() if IMAGE_FOLDERS[split_name] == folder
        ]
        split = in_folder[0][0]  # the folders' splits share their archive member
        classes_of = collections.defaultdict(list)  # cifar name -> fine labels of the images with it, in order
        taken = set()
        for row in np.sort(np.concatenate([rows for _, rows in in_folder])).tolist():
            name, fine_label = split.filenames[row], int(split.fine_labels[row])
            if not SAFE_IMAGE_NAME.fullmatch(name):
                raise UnsafeArchive(f"{archive_path.name} names an image {name!r}, not a plain file name")
            if fine_label in classes_of[name]:
                raise CorruptArchive(
                    f"{archive_path.name} has more than one image of class {class_names[fine_label]} "
                    f"named {folder}/{name}"
                )
            path = f"{folder}/{name}"
            if classes_of[name]:
                path = f"{folder}/{name.removesuffix('.png')}.{class_names[fine_label]}.png"
                if not SAFE_IMAGE_NAME.fullmatch(path.split("/", 1)[1]):
                    raise UnsafeArchive(
                        f"{archive_path.name} has a class {class_names[fine_label]!r}, not a plain name"
                    )
                renamed.append({"name": name, "staged_as": path, "class": class_names[fine_label]})
            if path in taken:
                raise CorruptArchive(f"{archive_path.name} has more than one image named {path}")
            classes_of[name].append(fine_label)
            taken.add(path)
            staged[folder, row] = path
    return {
        split_name: [staged[IMAGE_FOLDERS[split_name], row] for row in rows.tolist()]
        for split_name, (_, rows) in splits.items()
    }, renamed


def png_bytes(row: np.ndarray) -> bytes:
    """The PNG of a CIFAR row (1024 red, 1024 green, 1024 blue bytes, each plane row-major 32x32)."""
    image = Image.fromarray(row.reshape(3, IMAGE_SIDE, IMAGE_SIDE).transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def write_images(out: Path, images: list[tuple[str, np.ndarray]], progress: bool) -> tuple[dict[str, str], list[str]]:
    """Encode and write the images; answers the SHA-256 of each and the relative paths actually written."""

    def write_image(image: tuple[str, np.ndarray]) -> tuple[str, str, bool]:
        relative_path, row = image
        content = png_bytes(row)
        return relative_path, hashlib.sha256(content).hexdigest(), write_file(out / relative_path, content)

    hashes, written = {}, []
    # More threads than cores: Pillow holds the GIL while encoding such small images and file creation in one
    # folder serialises in the kernel, but waits on the disk overlap: 4 were the fastest of 1, 2 and 4 (bench/etl.py).
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        for relative_path, sha256, was_written in tqdm(
            pool.map(write_image, images), total=len(images), desc="write images", unit="img", disable=not progress
        ):
            hashes[relative_path] = sha256
            if was_written:
                written.append(relative_path)
    return hashes, written


def write_file(path: Path, content: bytes) -> bool:
    """Give `path` the bytes `content` unless it has them already; answers whether it wrote.
    The bytes go to a temporary name first, so `path` never holds a partial file."""
    try:
        if path.read_bytes() == content:
            return False
    except FileNotFoundError:
        pass
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)
    return True


def channel_stats(rows: np.ndarray) -> dict[str, list[float]]:
    """Mean and standard deviation of each colour channel of CIFAR rows, on the 0..1 scale."""
    channels = rows.reshape(len(rows), 3, -1)
    return {
        "mean": [float(channels[:, channel].mean() / 255) for channel in range(3)],
        "std": [float(channels[:, channel].std() / 255) for channel in range(3)],
    }


# ----------------------------------------------------------------------------------------- command


def names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",")]


def extra_classes(text: str):
    return ALL_OTHERS if text == ALL_OTHERS else () if text in ("none", "") else names(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.etl",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--source",
        metavar="PATH|URL",
        help="the CIFAR-100 python archive (default: $SCONES_CIFAR100, the cached copy, a download)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to stage into")
    parser.add_argument("--bucket", metavar="NAME", help="also upload to the root of this S3 bucket")
    parser.add_argument(
        "--classes",
        default=",".join(DEFAULT_CLASSES),
        metavar="a,b,...",
        help="CIFAR-100 fine label names, in label order (default: %(default)s)",
    )
    parser.add_argument(
        "--extra-classes",
        default=ALL_OTHERS,
        metavar="c,d,...|all|none",
        help="classes staged for training only, which the default recipe learns as neither (default: all, every "
        "other class the archive has)",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=DEFAULT_VALIDATION_FRACTION,
        metavar="F",
        help="part of each class's training images kept for validation (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation draw (default: %(default)s)")
    parser.add_argument(
        "--photos",
        metavar="DIR|s3://BUCKET/PREFIX/",
        help="also stage the labelled photos of this folder or S3 prefix: <class>/<photo>, with class bicycle, "
        "motorcycle, neither or another staged class",
    )
    args = parser.parse_args(argv)
    try:
        summary = stage(
            args.source,
            args.out,
            names(args.classes),
            args.bucket,
            extra_classes=extra_classes(args.extra_classes),
            validation_fraction=args.validation_fraction,
            seed=args.seed,
            progress=sys.stderr.isatty(),
            photos=args.photos,
        )
    except (EtlError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to finish", file=sys.stderr)
        return 130
    for renamed in summary.dataset.get("renamed", []):
        print(
            f"renamed {renamed['name']} of class {renamed['class']} to {renamed['staged_as']}: "
            "an image of another class has that name first",
            file=sys.stderr,
        )
    for skipped in summary.dataset.get("photos", {}).get("skipped", []):
        print(f"skipped photo {skipped['path']}: {skipped['reason']}", file=sys.stderr)
    print(summary.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
