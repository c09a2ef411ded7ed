"""Benchmark of the local SageMaker endpoint (local/endpoint/): latency and throughput with data capture on.

Run: `.venv/bin/python bench/endpoint.py` (options: --help). It starts moto's server and the endpoint servers as
separate processes, as `make run` does, and sends real CIFAR-100 bicycle and motorcycle images (the PNGs
`training.etl` stages, from the validation and test splits) over keep-alive HTTP connections to the SageMaker
Runtime path. Two models are served: the default recipe fitted by `training.fit` (the real handler,
training/inference.py; the photo model, EfficientNet-Lite0 at 128 px as TorchScript) and
the tiny Pillow model of the tests. Each is served twice at once, with capture on (100%, input and output, as the
stack configures it) and, for reference, off; the two are measured back to back, alternately, so that both see
the same load from the rest of the machine: latency p50/p99 at concurrency 1 and throughput at concurrency 16,
medians of the repeats, each run with the 1-minute load average before it. Every answered request's capture
record is counted in S3 once the servers have stopped (stopping uploads what is spooled). Results go to
bench/results/endpoint.json.

The same runs are made with the real photographs of `../shared/data/real-photos-dev/` (JPEGs and PNGs of 15 KB to
3 MB, each sent as its own bytes with the content type of its format, so decoding is measured too), and one more:
the answer latency of the largest photos with capture on and off, each photo sent to the two endpoints in turn
(alternately first), so that the difference is capture's own cost. Without that folder the photo runs are skipped,
with the reason printed. The photos are only read, never copied.
"""

import argparse
import http.client
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402
from local.endpoint import CaptureSpec, EndpointSpec, spec_to_json  # noqa: E402
from training import etl, fit  # noqa: E402
from training.etl import SHARED_ARCHIVE  # noqa: E402

FIT = {}  # the default recipe, fitted on the bicycle and motorcycle images alone: its serving cost is the same
RESULTS = ROOT / "bench" / "results" / "endpoint.json"
BUCKET = "scones-bench"
CLASSES = etl.DEFAULT_CLASSES
REPEATS = 5
LATENCY_REQUESTS = 500
CONCURRENCY = 16
THROUGHPUT_REQUESTS = 3200
GOAL = {"p50_ms_at_concurrency_1": 5.0, "requests_per_second_at_concurrency_16": 500.0}
PHOTOS = SHARED_ARCHIVE.parent / "real-photos-dev"
PHOTO_LATENCY_REQUESTS = 398  # each photo twice
PHOTO_THROUGHPUT_REQUESTS = 800
LARGEST = 10  # the photos of the capture on/off comparison
LARGEST_ROUNDS = 10  # each largest photo sent this many times to each endpoint per repeat
# Issue 23's goals, capture on, whatever the model (at most / at least).
GOAL_ISSUE_23 = {
    "cifar": {"p50_ms_at_concurrency_1": 10.0, "requests_per_second_at_concurrency_16": 200.0},
    "photos": {"p50_ms_at_concurrency_1": 25.0, "requests_per_second_at_concurrency_16": 80.0},
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(ready, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} did not start within {seconds}s")
        time.sleep(0.05)


Body = tuple[bytes, str]  # a request body and its content type


def staged_images(data: Path) -> list[Body]:
    """The validation and test images of the staged data folder."""
    return [
        ((data / line.split("\t")[-1]).read_bytes(), "image/png")
        for manifest in ("validation.lst", "test.lst")
        for line in (data / manifest).read_text().splitlines()
    ]


def content_type(body: bytes) -> str | None:
    """The content type of an image file's bytes, by its signature: PNG, JPEG, or None."""
    if body.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if body.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return None


def real_photos(folder: Path) -> tuple[list[tuple[str, bytes, str]], str]:
    """(name, bytes, content type) of every JPEG and PNG under folder, by name; or no photos and why."""
    if not folder.is_dir():
        return [], f"{folder} is absent"
    photos = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            body = path.read_bytes()
            if kind := content_type(body):
                photos.append((str(path.relative_to(folder)), body, kind))
    return photos, "" if photos else f"{folder} holds no JPEG or PNG"


class EndpointProcess:
    """`python -m local.endpoint` serving one endpoint, as `make run` starts it."""

    def __init__(self, spec: EndpointSpec, work: Path):
        spec_file = work / f"{spec.name}.json"
        spec_file.write_text(json.dumps({"endpoints": [spec_to_json(spec)]}))
        ready_file = work / f"{spec.name}.ready"
        ready_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "local.endpoint",
                "--spec",
                str(spec_file),
                "--port",
                "0",
                "--spool-dir",
                str(work / "spool"),
                "--ready-file",
                str(ready_file),
            ],
            cwd=ROOT,
            env={**os.environ, "TMPDIR": str(work)},
            stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: ready_file.exists() or self.process.poll() is not None, "the endpoint server")
        if self.process.poll() is not None:
            raise SystemExit("bench: the endpoint server exited")
        ready = json.loads(ready_file.read_text())
        if ready["pid"] != self.process.pid:
            raise SystemExit(f"bench: {ready_file} names process {ready['pid']}, not the one started")
        self.port = ready["port"]
        self.path = f"/endpoints/{spec.name}/invocations"

    def stop(self) -> None:
        """SIGTERM: the server answers the requests in progress and uploads its spooled captures."""
        self.process.terminate()
        if self.process.wait() != 0:
            raise SystemExit(f"bench: the endpoint server exited with status {self.process.returncode}")


def post(connection: http.client.HTTPConnection, path: str, image: Body) -> tuple[float, bool]:
    """POST one image on a keep-alive connection: (latency in s, answered 200)."""
    body, kind = image
    started = time.perf_counter()
    connection.request("POST", path, body=body, headers={"Content-Type": kind})
    response = connection.getresponse()
    response.read()
    return time.perf_counter() - started, response.status == 200


def send_all(port: int, path: str, images: list[Body], latencies: list[float]) -> int:
    """POST each image on one keep-alive connection; append each latency (s); return the count answered 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    answered = 0
    for image in images:
        latency, ok = post(connection, path, image)
        latencies.append(latency)
        answered += ok
    connection.close()
    return answered


def percentiles(latencies: list[float]) -> dict:
    milliseconds = sorted(1000 * latency for latency in latencies)
    return {
        "p50_ms": statistics.median(milliseconds),
        "p99_ms": milliseconds[max(int(0.99 * len(milliseconds)) - 1, 0)],
    }


def latency_run(endpoint: EndpointProcess, images: list[Body], requests: int) -> tuple[dict, int]:
    latencies = []
    answered = send_all(endpoint.port, endpoint.path, [images[i % len(images)] for i in range(requests)], latencies)
    return percentiles(latencies), answered


def paired_run(endpoints: dict[str, EndpointProcess], images: list[Body], rounds: int) -> tuple[dict, dict]:
    """Each image sent to every endpoint in turn, the first one alternating, `rounds` times, at concurrency 1:
    per endpoint, p50/p99 over all and each image's latencies (s); per endpoint, the count answered 200."""
    connections = {
        name: http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=60) for name, endpoint in endpoints.items()
    }
    latencies = {name: [[] for _ in images] for name in endpoints}
    answered = dict.fromkeys(endpoints, 0)
    order = list(endpoints)
    for _ in range(rounds):
        for number, image in enumerate(images):
            for name in order:
                latency, ok = post(connections[name], endpoints[name].path, image)
                latencies[name][number].append(latency)
                answered[name] += ok
            order.reverse()
    for connection in connections.values():
        connection.close()
    return {
        name: {**percentiles([latency for each in per_image for latency in each]), "per_photo": per_image}
        for name, per_image in latencies.items()
    }, answered


def throughput_run(endpoint: EndpointProcess, images: list[Body], requests: int) -> tuple[dict, int]:
    per_thread = requests // CONCURRENCY
    answered, latencies = [0] * CONCURRENCY, [[] for _ in range(CONCURRENCY)]

    def client(number: int) -> None:
        mine = [images[(number * per_thread + i) % len(images)] for i in range(per_thread)]
        answered[number] = send_all(endpoint.port, endpoint.path, mine, latencies[number])

    threads = [threading.Thread(target=client, args=(number,)) for number in range(CONCURRENCY)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    all_latencies = sorted(1000 * latency for thread_latencies in latencies for latency in thread_latencies)
    return {"requests_per_second": sum(answered) / seconds, "p50_ms": statistics.median(all_latencies)}, sum(answered)


def count_records(s3, prefix: str) -> tuple[int, int]:
    """(objects, lines) stored under prefix."""
    objects = lines = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            objects += 1
            lines += s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read().count(b"\n")
    return objects, lines


def bench_model(key: str, archive: Path, images: list[Body], named_photos: list, s3, work: Path, args, log) -> dict:
    """The CIFAR runs (as "capture_on" and "capture_off"), and with photos the same runs ("photos") and the largest
    photos' capture on/off comparison ("largest_photos")."""
    prefix = f"data_capture-{key}"
    specs = {
        "capture_on": EndpointSpec(
            f"bench-{key}", archive, CaptureSpec(f"s3://{BUCKET}/{prefix}", json_content_types=("application/json",))
        ),
        "capture_off": EndpointSpec(f"bench-{key}-off", archive),
    }
    photos = [(body, kind) for _, body, kind in named_photos]
    workloads = {"cifar": (images, args.latency_requests, args.throughput_requests)}
    if photos:
        workloads["photos"] = (photos, args.photo_latency_requests, args.photo_throughput_requests)
    largest = sorted(named_photos, key=lambda photo: len(photo[1]), reverse=True)[: args.largest]
    endpoints, answered = {}, dict.fromkeys(specs, 0)
    runs = {
        workload: {name: {"concurrency_1": [], f"concurrency_{CONCURRENCY}": []} for name in specs}
        for workload in workloads
    }
    paired = []
    try:
        for name, spec in specs.items():
            endpoints[name] = EndpointProcess(spec, work)
            warm_up = images[:200] + photos  # every photo once: its decoder's first use is not measured
            answered[name] += send_all(endpoints[name].port, endpoints[name].path, warm_up, [])
        for repeat in range(args.repeats):
            for workload, (bodies, latency_requests, throughput_requests) in workloads.items():
                for name, endpoint in endpoints.items():  # back to back, so that both see the same machine
                    for level, run, requests in (
                        ("concurrency_1", latency_run, latency_requests),
                        (f"concurrency_{CONCURRENCY}", throughput_run, throughput_requests),
                    ):
                        load = os.getloadavg()[0]
                        figures, count = run(endpoint, bodies, requests)
                        runs[workload][name][level].append({**figures, "load_average_1min": load})
                        answered[name] += count
            if largest:
                load = os.getloadavg()[0]
                figures, counts = paired_run(
                    endpoints, [(body, kind) for _, body, kind in largest], args.largest_rounds
                )
                paired.append({**figures, "load_average_1min": load})
                for name, count in counts.items():
                    answered[name] += count
            log(f"{key}: repeat {repeat + 1} of {args.repeats} done")
    finally:
        for endpoint in endpoints.values():
            endpoint.stop()
    result, sizes = {}, [len(body) for body, _ in photos]
    for workload, by_endpoint in runs.items():
        figures = {name: medians(levels) for name, levels in by_endpoint.items()}
        if workload == "cifar":
            result.update(figures)
        else:
            result[workload] = {
                "what": f"the {len(sizes)} photos of real-photos-dev, {statistics.mean(sizes) / 1024:.0f} KiB on "
                f"average ({min(sizes) / 1024:.0f} KiB to {max(sizes) / 2**20:.1f} MiB), JPEG and PNG, each sent as "
                "its own bytes",
                "requests": {
                    "concurrency_1": args.photo_latency_requests,
                    f"concurrency_{CONCURRENCY}": args.photo_throughput_requests,
                },
                **figures,
            }
        for name, levels in figures.items():
            log(
                f"{key} {workload} {name.replace('_', ' ')}: p50 {levels['concurrency_1']['p50_ms']:.2f} ms, "
                f"p99 {levels['concurrency_1']['p99_ms']:.2f} ms, "
                f"{levels[f'concurrency_{CONCURRENCY}']['requests_per_second']:.0f} req/s at {CONCURRENCY} "
                f"(load average {levels['concurrency_1']['load_average_1min']:.1f})"
            )
    if largest:
        result["largest_photos"] = largest_figures(largest, paired, args)
        for name in specs:
            figures = result["largest_photos"][name]
            log(
                f"{key} largest photos {name.replace('_', ' ')}: "
                f"p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms"
            )
    objects, records = count_records(s3, prefix)
    result["capture_on"]["capture"] = {
        "answered": answered["capture_on"],
        "records": records,
        "objects": objects,
        "records_per_object": records / max(objects, 1),
    }
    if records != answered["capture_on"]:
        raise SystemExit(f"bench: {answered['capture_on']} requests answered but {records} capture records stored")
    return result


def medians(levels: dict) -> dict:
    """Each figure's median over the runs of each level, and the runs."""
    figures = {
        level: {figure: statistics.median(run[figure] for run in level_runs) for figure in level_runs[0]}
        for level, level_runs in levels.items()
    }
    return {**figures, "runs": levels}


def largest_figures(largest: list[tuple[str, bytes, str]], paired: list[dict], args) -> dict:
    """The capture on/off comparison: medians over the repeats of p50/p99, and each photo's median latency."""
    names = [name for name in paired[0] if name != "load_average_1min"]
    result = {
        "what": f"the {len(largest)} largest photos, each sent to the capture-on and the capture-off endpoint in "
        f"turn (the first alternating), {args.largest_rounds} times per repeat, at concurrency 1; p50/p99 are "
        "medians over the repeats",
        "requests_per_repeat": len(largest) * args.largest_rounds,
    }
    for name in names:
        result[name] = {
            figure: statistics.median(run[name][figure] for run in paired) for figure in ("p50_ms", "p99_ms")
        }
    result["photos"] = [
        {
            "name": photo_name,
            "bytes": len(body),
            "content_type": kind,
            **{
                f"{name}_p50_ms": 1000
                * statistics.median(latency for run in paired for latency in run[name]["per_photo"][number])
                for name in names
            },
        }
        for number, (photo_name, body, kind) in enumerate(largest)
    ]
    result["capture_on_minus_off_p50_ms"] = result["capture_on"]["p50_ms"] - result["capture_off"]["p50_ms"]
    result["capture_on_minus_off_p99_ms"] = result["capture_on"]["p99_ms"] - result["capture_off"]["p99_ms"]
    result["runs"] = [
        {
            **{name: {figure: run[name][figure] for figure in ("p50_ms", "p99_ms")} for name in names},
            "load_average_1min": run["load_average_1min"],
        }
        for run in paired
    ]
    return result


def tiny_model(work: Path) -> Path:
    """The tests' tiny model (by path: site-packages may hold another package named `tests`)."""
    module_spec = importlib.util.spec_from_file_location(
        "test_local_endpoint", ROOT / "tests" / "test_local_endpoint.py"
    )
    tests = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(tests)
    return tests.model_archive(
        work,
        {
            "model.json": json.dumps({"crash_size": [0, 0]}),
            "code/inference.py": tests.TINY_INFERENCE,
            "code/shares.py": tests.TINY_SHARES,
        },
    )


def machine() -> dict:
    cpu = cpu_name()
    import moto
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "moto": moto.__version__,
        "boto3": boto3.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"runs of each measure (default {REPEATS})")
    parser.add_argument(
        "--latency-requests",
        type=int,
        default=LATENCY_REQUESTS,
        help=f"requests of a concurrency-1 run (default {LATENCY_REQUESTS})",
    )
    parser.add_argument(
        "--throughput-requests",
        type=int,
        default=THROUGHPUT_REQUESTS,
        help=f"requests of a concurrency-{CONCURRENCY} run (default {THROUGHPUT_REQUESTS})",
    )
    parser.add_argument(
        "--photos",
        type=Path,
        default=PHOTOS,
        help=f"the real photos' folder (default {PHOTOS}); runs skipped if absent",
    )
    parser.add_argument(
        "--photo-latency-requests",
        type=int,
        default=PHOTO_LATENCY_REQUESTS,
        help=f"requests of a photo concurrency-1 run (default {PHOTO_LATENCY_REQUESTS})",
    )
    parser.add_argument(
        "--photo-throughput-requests",
        type=int,
        default=PHOTO_THROUGHPUT_REQUESTS,
        help=f"requests of a photo concurrency-{CONCURRENCY} run (default {PHOTO_THROUGHPUT_REQUESTS})",
    )
    parser.add_argument(
        "--largest", type=int, default=LARGEST, help=f"photos of the capture on/off comparison (default {LARGEST})"
    )
    parser.add_argument(
        "--largest-rounds",
        type=int,
        default=LARGEST_ROUNDS,
        help=f"times each is sent to each endpoint per repeat (default {LARGEST_ROUNDS})",
    )
    parser.add_argument(
        "--model", type=Path, help="serve this model.tar.gz instead of fitting the default recipe with training.fit"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help=f"where the results go (default {RESULTS.relative_to(ROOT)})"
    )
    args = parser.parse_args()

    def log(message):
        print(f"bench: {message}", file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    moto_port = free_port()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{moto_port}",
        }
    )
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        s3 = boto3.client("s3")
        wait_until(lambda: _answers(moto_port), "moto's server")
        s3.create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory(prefix="scones-bench-") as directory:
            work = Path(directory)
            etl.stage(SHARED_ARCHIVE, work / "data", CLASSES, progress=False)
            images = staged_images(work / "data")
            photos, skipped = real_photos(args.photos)
            log(
                f"{len(images)} CIFAR images of {', '.join(CLASSES)} as PNG, "
                f"{statistics.mean(len(body) for body, _ in images):.0f} bytes on average; "
                + (f"{len(photos)} real photos" if photos else f"photo runs skipped: {skipped}")
                + ("" if args.model else "; fitting the default recipe with training.fit")
            )
            trained = args.model or fit.fit_local(work / "data", work / "fit", **FIT)
            models = {
                "training.fit, default recipe" if not args.model else str(args.model): trained,
                "tiny (tests' Pillow model)": tiny_model(work),
            }
            figures = {
                name: bench_model(key, archive, images, photos, s3, work, args, log)
                for (name, archive), key in zip(models.items(), ("trained", "tiny"), strict=False)
            }
    finally:
        moto.terminate()
        moto.wait()

    report = {
        "what": "local SageMaker endpoint (local/endpoint/) as its own process, capture to moto's S3 server "
        "(its own process); client: http.client keep-alive connections in the bench process, "
        f"CIFAR-100 validation and test images of {' and '.join(CLASSES)} as PNG (and under 'photos' the real "
        "photos of real-photos-dev, under 'largest_photos' capture on vs off for the largest); capture on and off "
        f"served at once and measured alternately; medians of {args.repeats} repeats",
        "command": " ".join(["bench/endpoint.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        # Other work on the machine competes for its 2 cores: the 1-minute load average before and after
        # (and before each run, in "runs").
        "load_average": {"before": load_before[0], "after": os.getloadavg()[0]},
        "requests": {"concurrency_1": args.latency_requests, f"concurrency_{CONCURRENCY}": args.throughput_requests},
        "photos": {"folder": str(args.photos), "count": len(photos)} if photos else {"skipped": skipped},
        "goal": GOAL,
        "goal_met_with_capture_on": {
            name: {
                "p50_ms_at_concurrency_1": model["capture_on"]["concurrency_1"]["p50_ms"]
                < GOAL["p50_ms_at_concurrency_1"],
                "requests_per_second_at_concurrency_16": model["capture_on"][f"concurrency_{CONCURRENCY}"][
                    "requests_per_second"
                ]
                >= GOAL["requests_per_second_at_concurrency_16"],
            }
            for name, model in figures.items()
        },
        "goal_issue_23": GOAL_ISSUE_23,
        "goal_issue_23_met_with_capture_on": {
            name: {
                workload: {
                    "p50_ms_at_concurrency_1": runs["capture_on"]["concurrency_1"]["p50_ms"]
                    <= goal["p50_ms_at_concurrency_1"],
                    "requests_per_second_at_concurrency_16": runs["capture_on"][f"concurrency_{CONCURRENCY}"][
                        "requests_per_second"
                    ]
                    >= goal["requests_per_second_at_concurrency_16"],
                }
                for workload, goal in GOAL_ISSUE_23.items()
                if (runs := model if workload == "cifar" else model.get(workload))
            }
            for name, model in figures.items()
        },
        "models": figures,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.output}")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
