"""Time the CIFAR-100 ETL on the shared vehicles copy: `.venv/bin/python bench/etl.py`.

Runs `python -m training.etl` for two classes and for all ten, each REPEATS times into a fresh folder and
then once more into the same folder (nothing new), and compares the medians with the goals. With the real
photos beside the checkout, it also times two classes plus those photos as `--photos` (bicycle/, motorcycle/,
and car/ and other/ as neither/), which has no goal: the photos are only timed, never trained on. It also times,
in-process, the choices behind the ETL's settings: the PNG compress level (encoding in memory) and the number
of threads that encode and write the images. Writes everything to bench/results/etl.json; the load average
is recorded because other work on the machine slows file creation a lot.
"""

import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training import etl  # noqa: E402
from training.etl import SHARED_ARCHIVE  # noqa: E402

SOURCE = Path(os.environ.get("SCONES_CIFAR100", SHARED_ARCHIVE))
RESULTS = ROOT / "bench" / "results" / "etl.json"
REPEATS = 5
VEHICLES = [
    "bicycle",
    "bus",
    "motorcycle",
    "pickup_truck",
    "train",
    "lawn_mower",
    "rocket",
    "streetcar",
    "tank",
    "tractor",
]
CASES = {"2 classes": (["bicycle", "motorcycle"], 3.0), "10 classes": (VEHICLES, 10.0)}
DEV_PHOTOS = SHARED_ARCHIVE.parent / "real-photos-dev"
PHOTO_FOLDERS = {"bicycle": "bicycle", "motorcycle": "motorcycle", "car": "neither", "other": "neither"}
COMPRESS_LEVELS = (0, 1, 6, 9)
THREAD_COUNTS = (1, 2, 4)


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def run_command(classes: list[str], out: Path, photos: Path | None = None) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "training.etl",
            "--source",
            str(SOURCE),
            "--out",
            str(out),
            "--classes",
            ",".join(classes),
            "--extra-classes",
            "none",  # the classes named only: the figures compare with earlier runs
            *(["--photos", str(photos)] if photos else []),
        ],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def time_command(classes: list[str], goal: float | None, photos: Path | None = None) -> dict:
    fresh, nothing_new = [], []
    for _ in range(REPEATS):
        with tempfile.TemporaryDirectory(prefix="etl-bench-") as folder:
            out = Path(folder) / "out"
            fresh.append(seconds(functools.partial(run_command, classes, out, photos)))
            nothing_new.append(seconds(functools.partial(run_command, classes, out, photos)))
            files = sum(1 for path in out.rglob("*") if path.is_file())
    return {
        "classes": classes,
        "files": files,
        "goal_s": goal,
        "fresh_median_s": round(statistics.median(fresh), 3),
        "fresh_s": [round(t, 3) for t in fresh],
        "nothing_new_median_s": round(statistics.median(nothing_new), 3),
        "nothing_new_s": [round(t, 3) for t in nothing_new],
        "goal_met": goal is None or statistics.median(fresh) < goal,
    }


def time_photos(folder: Path, two_classes: dict) -> dict:
    """Two classes plus the real photos as --photos, from a folder of links to them in the ETL's layout."""
    for name, label in PHOTO_FOLDERS.items():
        (folder / label).mkdir(exist_ok=True)
        for photo in sorted((DEV_PHOTOS / name).iterdir()):
            (folder / label / f"{name}-{photo.name}").symlink_to(photo)
    photos = [path for path in folder.rglob("*") if path.is_file()]
    figures = time_command(["bicycle", "motorcycle"], None, folder)
    return {
        **figures,
        "photos": len(photos),
        "photo_megabytes": round(sum(path.stat().st_size for path in photos) / 1e6, 1),
        "fresh_over_2_classes_s": round(figures["fresh_median_s"] - two_classes["fresh_median_s"], 3),
    }


def time_image_writing(images: list, threads: int) -> float:
    """Median seconds to encode and write `images` into a fresh folder with etl.png_bytes and etl.write_file,
    spread over `threads` threads (the ETL uses etl.WRITE_THREADS)."""

    def write(out: Path) -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda image: etl.write_file(out / image[0], etl.png_bytes(image[1])), images))

    times = []
    for _ in range(3):
        with tempfile.TemporaryDirectory(prefix="etl-bench-") as folder:
            (Path(folder) / "train").mkdir()
            (Path(folder) / "test").mkdir()
            times.append(seconds(lambda: write(Path(folder))))
    return statistics.median(times)


def time_png_encoding(images: list, level: int) -> tuple[float, int]:
    """Median seconds of etl.png_bytes over `images` (in memory) at compress `level`, and the bytes per image."""
    etl.PNG_COMPRESS_LEVEL = level
    times = [seconds(lambda: [etl.png_bytes(row) for _, row in images]) for _ in range(3)]
    return statistics.median(times), round(sum(len(etl.png_bytes(row)) for _, row in images) / len(images))


def tuning() -> dict:
    """Timings behind etl.PNG_COMPRESS_LEVEL and etl.WRITE_THREADS, on the images of all ten classes."""
    chosen_level = etl.PNG_COMPRESS_LEVEL
    archive = etl.read_archive(SOURCE)
    fine_ids = etl.fine_label_ids(VEHICLES, archive, SOURCE)
    images = etl.image_files(etl.split_rows(archive, fine_ids, fine_ids, etl.DEFAULT_VALIDATION_FRACTION, seed=0))
    levels = {}
    for level in COMPRESS_LEVELS:
        elapsed, size = time_png_encoding(images, level)
        levels[str(level)] = {"encode_s": round(elapsed, 3), "bytes_per_image": size}
    etl.PNG_COMPRESS_LEVEL = chosen_level
    threads = {str(count): round(time_image_writing(images, count), 3) for count in THREAD_COUNTS}
    return {
        "images": len(images),
        "png_compress_level": levels,
        "chosen_png_compress_level": chosen_level,
        "encode_and_write_s_by_threads": threads,
        "chosen_write_threads": etl.WRITE_THREADS,
    }


def main() -> int:
    if not SOURCE.is_file():
        print(f"bench: no archive at {SOURCE} (set SCONES_CIFAR100)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    command = {case: time_command(classes, goal) for case, (classes, goal) in CASES.items()}
    if DEV_PHOTOS.is_dir():
        with tempfile.TemporaryDirectory(prefix="etl-bench-photos-") as folder:
            command["2 classes and real-photos-dev"] = time_photos(Path(folder), command["2 classes"])
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "load_average_before": [round(load, 2) for load in load_before],
        },
        "source": {"path": str(SOURCE), "sha256": etl.sha256_of_file(SOURCE)},
        "repeats": REPEATS,
        "command": command,
        "tuning": tuning(),
    }
    results["machine"]["load_average_after"] = [round(load, 2) for load in os.getloadavg()]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    etl.write_file(RESULTS, (json.dumps(results, indent=2) + "\n").encode())

    for case, figures in command.items():
        goal = (
            f"goal < {figures['goal_s']:.0f} s, {'met' if figures['goal_met'] else 'MISSED'}"
            if figures["goal_s"]
            else "no goal"
        )
        print(
            f"{case}: {figures['fresh_median_s']:.2f} s ({goal}), nothing new {figures['nothing_new_median_s']:.2f} s, "
            f"{figures['files']} files, median of {REPEATS}"
        )
    for level, figures in results["tuning"]["png_compress_level"].items():
        print(
            f"PNG compress level {level}: encoding {figures['encode_s']:.2f} s, "
            f"{figures['bytes_per_image']} bytes per image"
        )
    for count, elapsed in results["tuning"]["encode_and_write_s_by_threads"].items():
        print(f"encode and write with {count} threads: {elapsed:.2f} s")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0 if all(figures["goal_met"] for figures in command.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
