"""Time the CIFAR-100 ETL on the shared vehicles copy: `.venv/bin/python bench/etl.py`.

Runs `python -m training.etl` for two classes and for all ten, each REPEATS times into a fresh folder and
then once more into the same folder (nothing new), and compares the medians with the goals. It also times,
in-process, the choices behind the ETL's settings: the PNG compress level and the number of threads that
encode and write the images. Writes everything to bench/results/etl.json.
"""

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training import etl  # noqa: E402

SOURCE = Path(os.environ.get("SCONES_CIFAR100", "/work/shared/data/cifar-100-python-vehicles.tar.gz"))
RESULTS = ROOT / "bench" / "results" / "etl.json"
REPEATS = 5
VEHICLES = ["bicycle", "bus", "motorcycle", "pickup_truck", "train",
            "lawn_mower", "rocket", "streetcar", "tank", "tractor"]
CASES = {"2 classes": (["bicycle", "motorcycle"], 3.0), "10 classes": (VEHICLES, 10.0)}
COMPRESS_LEVELS = (0, 1, 6, 9)
WORKER_COUNTS = (1, 2, 4)


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def run_command(classes: list[str], out: Path) -> None:
    subprocess.run([sys.executable, "-m", "training.etl", "--source", str(SOURCE), "--out", str(out),
                    "--classes", ",".join(classes)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def time_command(classes: list[str], goal: float) -> dict:
    fresh, nothing_new = [], []
    for _ in range(REPEATS):
        with tempfile.TemporaryDirectory(prefix="etl-bench-") as folder:
            out = Path(folder) / "out"
            fresh.append(seconds(lambda: run_command(classes, out)))
            nothing_new.append(seconds(lambda: run_command(classes, out)))
            files = sum(1 for path in out.rglob("*") if path.is_file())
    return {"classes": classes, "files": files, "goal_s": goal,
            "fresh_median_s": round(statistics.median(fresh), 3), "fresh_s": [round(t, 3) for t in fresh],
            "nothing_new_median_s": round(statistics.median(nothing_new), 3),
            "nothing_new_s": [round(t, 3) for t in nothing_new],
            "goal_met": statistics.median(fresh) < goal}


def time_image_writing(images: list, **settings) -> tuple[float, int]:
    """Median seconds for etl.write_images of `images` into a fresh folder with the module `settings`,
    and the bytes written."""
    defaults = {name: getattr(etl, name) for name in settings}
    for name, value in settings.items():
        setattr(etl, name, value)
    try:
        times = []
        for _ in range(3):
            with tempfile.TemporaryDirectory(prefix="etl-bench-") as folder:
                (Path(folder) / "train").mkdir()
                (Path(folder) / "test").mkdir()
                times.append(seconds(lambda: etl.write_images(Path(folder), images, progress=False)))
                size = sum(path.stat().st_size for path in Path(folder).rglob("*.png"))
        return statistics.median(times), size
    finally:
        for name, value in defaults.items():
            setattr(etl, name, value)


def tuning() -> dict:
    archive = etl.read_archive(SOURCE)
    fine_ids = etl.fine_label_ids(VEHICLES, archive, SOURCE)
    train, validation, test = etl.split_rows(archive, fine_ids, etl.DEFAULT_VALIDATION_FRACTION, 0)
    images = [(f"train/{archive.train.filenames[row]}", archive.train.data[row]) for row in np.sort(
        np.concatenate([train, validation]))]
    images += [(f"test/{archive.test.filenames[row]}", archive.test.data[row]) for row in test]
    levels = {}
    for level in COMPRESS_LEVELS:
        elapsed, size = time_image_writing(images, PNG_COMPRESS_LEVEL=level)
        levels[str(level)] = {"write_s": round(elapsed, 3), "bytes_per_image": round(size / len(images))}
    workers = {str(count): round(time_image_writing(images, WRITE_WORKERS=count)[0], 3) for count in WORKER_COUNTS}
    return {"images": len(images), "png_compress_level": levels, "write_workers": workers,
            "chosen": {"png_compress_level": etl.PNG_COMPRESS_LEVEL, "write_workers": etl.WRITE_WORKERS}}


def main() -> int:
    if not SOURCE.is_file():
        print(f"bench: no archive at {SOURCE} (set SCONES_CIFAR100)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    command = {case: time_command(classes, goal) for case, (classes, goal) in CASES.items()}
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "numpy": np.__version__, "pillow": PIL.__version__,
                    "load_average_before": [round(load, 2) for load in load_before]},
        "source": {"path": str(SOURCE), "sha256": etl.sha256_of_file(SOURCE)},
        "repeats": REPEATS,
        "command": command,
        "tuning": tuning(),
    }
    results["machine"]["load_average_after"] = [round(load, 2) for load in os.getloadavg()]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    partial = RESULTS.with_name(RESULTS.name + ".tmp")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(partial, RESULTS)

    for case, figures in command.items():
        print(f"{case}: {figures['fresh_median_s']:.2f} s (goal < {figures['goal_s']:.0f} s, "
              f"{'met' if figures['goal_met'] else 'MISSED'}), nothing new {figures['nothing_new_median_s']:.2f} s, "
              f"{figures['files']} files, median of {REPEATS}")
    for level, figures in results["tuning"]["png_compress_level"].items():
        print(f"PNG compress level {level}: {figures['write_s']:.2f} s, {figures['bytes_per_image']} bytes per image")
    for count, elapsed in results["tuning"]["write_workers"].items():
        print(f"{count} write threads: {elapsed:.2f} s")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0 if all(figures["goal_met"] for figures in command.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
