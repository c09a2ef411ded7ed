"""Read Model Monitor capture records from a folder or S3 into columns of numbers.

A record gives its time, the model's answer (a JSON list of class probabilities) and statistics of the
image it was asked about. A line that cannot be read becomes a `Failure` naming its file and line.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import heapq
import io
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

CAPTURE_SUFFIXES = (".jsonl", ".jsonl.gz")
CHANNELS = ("red", "green", "blue")
LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 weights of red, green, blue
HOUR_FOLDER = re.compile(r"(?:^|/)(\d{4})/(\d{2})/(\d{2})/(\d{2})/[^/]*$")
LOWEST_KEPT = 24  # lowest-confidence images kept for the report's grid
PARALLEL_FILES = 8  # from this many files on, files are read by one process per core


class CaptureError(Exception):
    """A user mistake about the captures (no such prefix, no records); the CLI prints it as one line."""


class NoCaptures(CaptureError):
    """Nothing was captured in the range asked (no capture file, or no record in the files): for a scheduled
    report over the last hour this is a quiet hour (`--allow-empty`), not a mistake."""


@dataclass(frozen=True)
class Failure:
    file: str
    line: int
    reason: str


@dataclass(frozen=True)
class LowConfidence:
    """A captured image kept for the report because the model was unsure about it."""

    confidence: float
    time: float
    probabilities: tuple[float, ...]
    image: bytes


@dataclass
class Captures:
    """One row per record read; NaN where a record lacks its input or its output."""

    times: np.ndarray  # seconds since the epoch, UTC
    probabilities: np.ndarray  # (N, classes)
    channel_means: np.ndarray  # (N, 3) per-image mean of red, green, blue, 0..1
    channel_stds: np.ndarray  # (N, 3) per-image standard deviation of each channel, 0..1
    border_minus_centre: np.ndarray  # (N,) per-image luminance of the border band minus that of the centre
    sizes: list[str]  # "32x32"; "" without input
    formats: list[str]  # PIL format and mode, e.g. "PNG/RGB"; "" without input
    failures: list[Failure] = field(default_factory=list)
    lowest: list[LowConfidence] = field(default_factory=list)
    files: int = 0

    def __len__(self) -> int:
        return len(self.times)


# --------------------------------------------------------------------------------------------- locations


def split_s3_uri(uri: str) -> tuple[str, str]:
    """("bucket", "key/prefix") of "s3://bucket/key/prefix"."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def list_capture_files(prefix: str, since: datetime | None = None, until: datetime | None = None) -> list[str]:
    """Every capture file under `prefix` (a folder or s3://bucket/key-prefix) that may hold records in range."""
    if prefix.startswith("s3://"):
        bucket, key_prefix = split_s3_uri(prefix)
        names = [f"s3://{bucket}/{key}" for key in _s3_keys(bucket, key_prefix, since, until)]
    else:
        folder = Path(prefix)
        if not folder.is_dir():
            raise CaptureError(f"no capture folder {prefix}")
        names = [str(path) for path in folder.rglob("*") if path.is_file()]
    files = sorted(name for name in names if name.endswith(CAPTURE_SUFFIXES) and _hour_in_range(name, since, until))
    if not files:
        raise NoCaptures(
            f"no capture files (*.jsonl, *.jsonl.gz) under {prefix}"
            + (" in the time range asked" if since or until else "")
        )
    return files


def _s3_keys(bucket: str, key_prefix: str, since: datetime | None, until: datetime | None) -> list[str]:
    """The keys under `key_prefix`, folder by folder: date folders (YYYY/MM/DD/HH/) wholly outside the range
    are not listed, so an hourly run lists a few folders, not the whole retention period."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    paginator = boto3.client("s3").get_paginator("list_objects_v2")
    keys, folders = [], [(key_prefix, ())]
    try:
        while folders:
            folder, date = folders.pop()
            for page in paginator.paginate(Bucket=bucket, Prefix=folder, Delimiter="/"):
                keys += [entry["Key"] for entry in page.get("Contents", [])]
                for common in page.get("CommonPrefixes", []):
                    name = common["Prefix"][len(folder) : -1]
                    inner = date + (int(name),) if _is_date_part(name, date) else ()
                    if not inner or _overlaps(inner, since, until):
                        folders.append((common["Prefix"], inner))
    except (BotoCoreError, ClientError) as error:
        raise CaptureError(f"cannot list s3://{bucket}/{key_prefix}: {error}") from None
    return keys


def _is_date_part(name: str, date: tuple[int, ...]) -> bool:
    """Whether a folder named `name` below the date folders `date` is the next of year, month, day, hour."""
    return name.isdigit() and len(date) < 4 and len(name) == (4 if not date else 2)


def _overlaps(date: tuple[int, ...], since: datetime | None, until: datetime | None) -> bool:
    """Whether the period a date folder covers (a year, month, day or hour) may hold records in range."""
    try:
        start = datetime(*date, *(1,) * max(0, 3 - len(date)), tzinfo=UTC)
    except ValueError:  # not a date after all (month 13): list it
        return True
    if len(date) == 1:
        end = start.replace(year=start.year + 1)
    elif len(date) == 2:
        end = (start + timedelta(days=32)).replace(day=1)
    else:
        end = start + (timedelta(days=1) if len(date) == 3 else timedelta(hours=1))
    # a file begun in the hour before `since` may hold its records
    return (since is None or end + timedelta(hours=1) > since) and (until is None or start < until)


def _hour_in_range(name: str, since: datetime | None, until: datetime | None) -> bool:
    """False only for a file in an hour folder wholly outside [since, until); a file named after its first
    record may hold records of the next hour, so the hour before `since` is kept."""
    match = HOUR_FOLDER.search(name)
    return not match or _overlaps(tuple(map(int, match.groups())), since, until)


def _read_bytes(name: str) -> bytes:
    if name.startswith("s3://"):
        import boto3

        bucket, key = split_s3_uri(name)
        content = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    else:
        content = Path(name).read_bytes()
    return gzip.decompress(content) if name.endswith(".gz") else content


# --------------------------------------------------------------------------------------------- records


def parse_time(text: str) -> float:
    """Seconds since the epoch of an ISO time such as 2026-11-25T08:59:59Z or ...59.123Z."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _payload(captured: dict) -> bytes:
    data = captured["data"]
    if captured.get("encoding", "BASE64").upper() == "BASE64":
        return base64.b64decode(data, validate=True)
    return data.encode("utf-8")


def _probabilities(captured: dict) -> list[float]:
    text = _payload(captured).decode("utf-8").strip()
    if captured.get("encoding", "").upper() == "CSV" or not text.startswith(("[", "{")):
        values = [float(value) for value in text.split(",")]
    else:
        values = json.loads(text)
        if isinstance(values, dict):  # {"probabilities": [...]}, as some handlers answer
            values = values.get("probabilities") or values.get("predictions")
        if values and isinstance(values[0], list):  # a batch of one
            values = values[0]
    if not values or not all(isinstance(value, (int, float)) for value in values):
        raise ValueError(f"the answer {text[:60]!r} is not a list of probabilities")
    return [float(value) for value in values]


def _image(captured: dict) -> tuple[Image.Image, bytes]:
    body = _payload(captured)
    image = Image.open(io.BytesIO(body))
    image.load()
    return image, body


@dataclass
class _FileColumns:
    times: list = field(default_factory=list)
    probabilities: list = field(default_factory=list)
    pixels: list = field(default_factory=list)  # RGB uint8 arrays, None without input
    sizes: list = field(default_factory=list)
    formats: list = field(default_factory=list)
    bodies: list = field(default_factory=list)
    failures: list = field(default_factory=list)


def read_file(name: str, since: float | None = None, until: float | None = None) -> tuple[dict, list[Failure], list]:
    """The columns of one capture file (see `Captures`), its failures and its lowest-confidence images."""
    columns = _FileColumns()
    try:
        lines = _read_bytes(name).splitlines()
    except Exception as error:  # an unreadable file is reported like a bad line, never fatal
        return _columns_of(columns), [Failure(name, 0, f"cannot read the file: {error}")], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            time = parse_time(record["eventMetadata"]["inferenceTime"])
            if (since is not None and time < since) or (until is not None and time >= until):
                continue
            data = record["captureData"]
            if "endpointInput" not in data and "endpointOutput" not in data:
                raise KeyError("endpointInput and endpointOutput")
            probabilities = _probabilities(data["endpointOutput"]) if "endpointOutput" in data else None
            image, body = _image(data["endpointInput"]) if "endpointInput" in data else (None, b"")
            pixels = None if image is None else np.asarray(image.convert("RGB"))
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            IndexError,
            OSError,
            binascii.Error,
            Image.DecompressionBombError,
        ) as error:
            reason = f"missing {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
            columns.failures.append(Failure(name, number, reason[:200]))
            continue
        columns.times.append(time)
        columns.probabilities.append(probabilities)
        columns.pixels.append(pixels)
        columns.sizes.append("" if image is None else f"{image.width}x{image.height}")
        columns.formats.append("" if image is None else f"{image.format}/{image.mode}")
        columns.bodies.append(body)
    return _columns_of(columns), columns.failures, _lowest_of(columns)


def _columns_of(columns: _FileColumns) -> dict:
    count = len(columns.times)
    width = max((len(row) for row in columns.probabilities if row), default=0)
    probabilities = np.full((count, width), np.nan)
    for index, row in enumerate(columns.probabilities):
        if row and len(row) == width:
            probabilities[index] = row
    means, stds = np.full((count, 3), np.nan), np.full((count, 3), np.nan)
    contrasts = np.full(count, np.nan)
    present = [index for index, pixels in enumerate(columns.pixels) if pixels is not None]
    for shape in {columns.pixels[index].shape for index in present}:  # one stack per image size: vectorised
        rows = [index for index in present if columns.pixels[index].shape == shape]
        means[rows], stds[rows], contrasts[rows] = image_statistics(np.stack([columns.pixels[index] for index in rows]))
    return {
        "times": np.array(columns.times, dtype=float),
        "probabilities": probabilities,
        "channel_means": means,
        "channel_stds": stds,
        "border_minus_centre": contrasts,
        "sizes": columns.sizes,
        "formats": columns.formats,
    }


def border_centre_weights(height: int, width: int) -> np.ndarray:
    """Pixel weights (height * width) whose dot product with an image is its border mean minus its centre mean.

    The border is the band of an eighth of each side along the four edges (4 pixels of 32), the centre the
    middle half of each side (16 x 16 of 32 x 32). Photos of a vehicle have it in the middle, before a
    background that is mostly lighter (sky, road, a studio's white); colour inversion turns that around, while
    it leaves the channel means of such images (near 0.5) and their spreads almost where they were.
    """
    band_y, band_x = max(1, height // 8), max(1, width // 8)
    border = np.ones((height, width), dtype=bool)
    border[band_y : height - band_y, band_x : width - band_x] = False
    centre = np.zeros((height, width), dtype=bool)
    centre[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    weights = border / border.sum() - centre / max(1, centre.sum())
    return weights.astype(np.float32).ravel()


def image_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image channel means and standard deviations (0..1, (N, 3) each) of uint8 RGB images
    (N, height, width, 3), and the luminance (ITU-R BT.601) of their border minus that of their centre (N,)."""
    count, height, width = images.shape[:3]
    # Channels first and contiguous: reducing the last axis is several times faster than a strided one.
    pixels = images.reshape(count, -1, 3).transpose(0, 2, 1).astype(np.float32) / 255
    means = pixels.mean(axis=2)
    contrasts = (pixels @ border_centre_weights(height, width)) @ LUMINANCE
    deviations = pixels - means[:, :, None]
    return means, np.sqrt(np.einsum("ncp,ncp->nc", deviations, deviations) / pixels.shape[2]), contrasts


def _lowest_of(columns: _FileColumns) -> list[LowConfidence]:
    candidates = [(max(row), index) for index, row in enumerate(columns.probabilities) if row and columns.bodies[index]]
    return [
        LowConfidence(confidence, columns.times[index], tuple(columns.probabilities[index]), columns.bodies[index])
        for confidence, index in heapq.nsmallest(LOWEST_KEPT, candidates)
    ]


def _read_file_of(arguments) -> tuple[dict, list[Failure], list]:
    return read_file(*arguments)


def read_captures(
    prefix: str, since: datetime | None = None, until: datetime | None = None, progress: bool = True
) -> Captures:
    """Every record under `prefix` whose inferenceTime is in [since, until)."""
    files = list_capture_files(prefix, since, until)
    jobs = [(name, since and since.timestamp(), until and until.timestamp()) for name in files]
    workers = min(os.cpu_count() or 1, len(files)) if len(files) >= PARALLEL_FILES else 1
    bar = tqdm(total=len(files), unit="file", desc="read captures", disable=not progress)
    with bar:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = list(bar_through(pool.map(_read_file_of, jobs, chunksize=4), bar))
        else:
            results = list(bar_through(map(_read_file_of, jobs), bar))
    return _merged(results, len(files))


def bar_through(results, bar):
    for result in results:
        bar.update()
        yield result


def _merged(results: list, file_count: int) -> Captures:
    columns = [result[0] for result in results if len(result[0]["times"])]
    width = max((part["probabilities"].shape[1] for part in columns), default=0)

    def padded(probabilities):
        extra = width - probabilities.shape[1]
        return np.pad(probabilities, ((0, 0), (0, extra)), constant_values=np.nan) if extra else probabilities

    captures = Captures(
        times=np.concatenate([part["times"] for part in columns]) if columns else np.empty(0),
        probabilities=np.concatenate([padded(part["probabilities"]) for part in columns])
        if columns
        else np.empty((0, 0)),
        channel_means=np.concatenate([part["channel_means"] for part in columns]) if columns else np.empty((0, 3)),
        channel_stds=np.concatenate([part["channel_stds"] for part in columns]) if columns else np.empty((0, 3)),
        border_minus_centre=np.concatenate([part["border_minus_centre"] for part in columns])
        if columns
        else np.empty(0),
        sizes=[size for part in columns for size in part["sizes"]],
        formats=[kind for part in columns for kind in part["formats"]],
        failures=[failure for result in results for failure in result[1]],
        lowest=heapq.nsmallest(
            LOWEST_KEPT, (kept for result in results for kept in result[2]), key=lambda kept: kept.confidence
        ),
        files=file_count,
    )
    order = np.argsort(captures.times, kind="stable")
    captures.times, captures.probabilities = captures.times[order], captures.probabilities[order]
    captures.channel_means, captures.channel_stds = captures.channel_means[order], captures.channel_stds[order]
    captures.border_minus_centre = captures.border_minus_centre[order]
    captures.sizes = [captures.sizes[index] for index in order]
    captures.formats = [captures.formats[index] for index in order]
    return captures
