"""Benchmark of the local SageMaker endpoint (local/endpoint/): latency and throughput with data capture on.

Run: `.venv/bin/python bench/endpoint.py` (options: --help). It starts moto's server and the endpoint servers as
separate processes, as `make run` does, and sends real CIFAR-100 bicycle and motorcycle images (the PNGs
`training.etl` stages, from the validation and test splits) over keep-alive HTTP connections to the SageMaker
Runtime path. Two models are served: a 2-epoch fit by `training.fit` (the real handler, training/inference.py) and
the tiny Pillow model of the tests. Each is served twice at once, with capture on (100%, input and output, as the
stack configures it) and, for reference, off; the two are measured back to back, alternately, so that both see
the same load from the rest of the machine: latency p50/p99 at concurrency 1 and throughput at concurrency 16,
medians of the repeats, each run with the 1-minute load average before it. Every answered request's capture
record is counted in S3 once the servers have stopped (stopping uploads what is spooled). Results go to
bench/results/endpoint.json.
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

from local.endpoint import CaptureSpec, EndpointSpec, spec_to_json  # noqa: E402
from training import etl, fit  # noqa: E402
from training.etl import SHARED_ARCHIVE  # noqa: E402

FIT = {"epochs": 2}
RESULTS = ROOT / "bench" / "results" / "endpoint.json"
BUCKET = "scones-bench"
CLASSES = etl.DEFAULT_CLASSES
REPEATS = 5
LATENCY_REQUESTS = 500
CONCURRENCY = 16
THROUGHPUT_REQUESTS = 3200
GOAL = {"p50_ms_at_concurrency_1": 5.0, "requests_per_second_at_concurrency_16": 500.0}


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


def staged_images(data: Path) -> list[bytes]:
    """The validation and test images of the staged data folder."""
    return [
        (data / line.split("\t")[-1]).read_bytes()
        for manifest in ("validation.lst", "test.lst")
        for line in (data / manifest).read_text().splitlines()
    ]


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


def send_all(port: int, path: str, images: list[bytes], latencies: list[float]) -> int:
    """POST each image on one keep-alive connection; append each latency (s); return the count answered 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    answered = 0
    for image in images:
        started = time.perf_counter()
        connection.request("POST", path, body=image, headers={"Content-Type": "image/png"})
        response = connection.getresponse()
        response.read()
        latencies.append(time.perf_counter() - started)
        answered += response.status == 200
    connection.close()
    return answered


def latency_run(endpoint: EndpointProcess, images: list[bytes], requests: int) -> tuple[dict, int]:
    latencies = []
    answered = send_all(endpoint.port, endpoint.path, [images[i % len(images)] for i in range(requests)], latencies)
    milliseconds = sorted(1000 * latency for latency in latencies)
    p99 = milliseconds[int(0.99 * len(milliseconds)) - 1]
    return {"p50_ms": statistics.median(milliseconds), "p99_ms": p99}, answered


def throughput_run(endpoint: EndpointProcess, images: list[bytes], requests: int) -> tuple[dict, int]:
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


def bench_model(key: str, archive: Path, images: list[bytes], s3, work: Path, args, log) -> dict:
    prefix = f"data_capture-{key}"
    specs = {
        "capture_on": EndpointSpec(
            f"bench-{key}", archive, CaptureSpec(f"s3://{BUCKET}/{prefix}", json_content_types=("application/json",))
        ),
        "capture_off": EndpointSpec(f"bench-{key}-off", archive),
    }
    endpoints, answered = {}, dict.fromkeys(specs, 0)
    runs = {name: {"concurrency_1": [], f"concurrency_{CONCURRENCY}": []} for name in specs}
    try:
        for name, spec in specs.items():
            endpoints[name] = EndpointProcess(spec, work)
            answered[name] += send_all(endpoints[name].port, endpoints[name].path, images[:200], [])  # warm-up
        for _ in range(args.repeats):
            for name, endpoint in endpoints.items():  # back to back, so that both see the same machine
                for level, run, requests in (
                    ("concurrency_1", latency_run, args.latency_requests),
                    (f"concurrency_{CONCURRENCY}", throughput_run, args.throughput_requests),
                ):
                    load = os.getloadavg()[0]
                    figures, count = run(endpoint, images, requests)
                    runs[name][level].append({**figures, "load_average_1min": load})
                    answered[name] += count
    finally:
        for endpoint in endpoints.values():
            endpoint.stop()
    result = {}
    for name, levels in runs.items():
        figures = {
            level: {figure: statistics.median(run[figure] for run in level_runs) for figure in level_runs[0]}
            for level, level_runs in levels.items()
        }
        figures["runs"] = levels
        if name == "capture_on":
            objects, records = count_records(s3, prefix)
            figures["capture"] = {
                "answered": answered[name],
                "records": records,
                "objects": objects,
                "records_per_object": records / max(objects, 1),
            }
            if records != answered[name]:
                raise SystemExit(f"bench: {answered[name]} requests answered but {records} capture records stored")
        result[name] = figures
        log(
            f"{key} {name.replace('_', ' ')}: p50 {figures['concurrency_1']['p50_ms']:.2f} ms, "
            f"p99 {figures['concurrency_1']['p99_ms']:.2f} ms, "
            f"{figures[f'concurrency_{CONCURRENCY}']['requests_per_second']:.0f} req/s at {CONCURRENCY} "
            f"(load average {figures['concurrency_1']['load_average_1min']:.1f})"
        )
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
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
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
        "--model", type=Path, help=f"serve this model.tar.gz instead of fitting one ({FIT} with training.fit)"
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
            log(
                f"{len(images)} CIFAR images of {', '.join(CLASSES)} as PNG, "
                f"{statistics.mean(map(len, images)):.0f} bytes on average"
                + ("" if args.model else f"; fitting {FIT} with training.fit")
            )
            trained = args.model or fit.fit_local(work / "data", work / "fit", **FIT)
            models = {
                "training.fit, 2 epochs" if not args.model else str(args.model): trained,
                "tiny (tests' Pillow model)": tiny_model(work),
            }
            figures = {
                name: bench_model(key, archive, images, s3, work, args, log)
                for (name, archive), key in zip(models.items(), ("trained", "tiny"), strict=False)
            }
    finally:
        moto.terminate()
        moto.wait()

    report = {
        "what": "local SageMaker endpoint (local/endpoint/) as its own process, capture to moto's S3 server "
        "(its own process); client: http.client keep-alive connections in the bench process, "
        f"CIFAR-100 validation and test images of {' and '.join(CLASSES)} as PNG; capture on and off "
        f"served at once and measured alternately; medians of {args.repeats} repeats",
        "command": " ".join(["bench/endpoint.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        # Other work on the machine competes for its 2 cores: the 1-minute load average before and after
        # (and before each run, in "runs").
        "load_average": {"before": load_before[0], "after": os.getloadavg()[0]},
        "requests": {"concurrency_1": args.latency_requests, f"concurrency_{CONCURRENCY}": args.throughput_requests},
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
