"""Time the synthesized classification workflow on the local engine: `.venv/bin/python bench/workflow.py`.

    .venv/bin/python bench/workflow.py [--repeats 3] [--model PATH/model.tar.gz] [--photos DIR]

Needs `make synth` (cdk.out) and a trained model (`--model`, else the one `make run` leaves in .scones/model,
else a 10-epoch 32-px model of the two classes is trained here, confident on most images, so that executions take
both paths). Runs the local AWS (`python -m local.aws`: moto, the Step Functions engine, the in-process
Lambdas) and the local endpoint (`python -m local.endpoint`, data capture on) each as its own process, as
`make run` does; this process is the console user, starting executions and polling them.

Two sets of images go through the synthesized classify-image state machine, one at a time and 8 at a time,
and through the same three handlers chained directly in a loop (what the engine adds is the rest):
- `cifar`: the 100 real CIFAR-100 test images of bicycle and motorcycle (32x32 PNGs), staged by the ETL;
- `photos`: every real photo of 0.1 to 3 MB in ../shared/data/real-photos-dev (its SOURCES.tsv gives the
  sizes), uploaded to the bucket under photos/. Photos over the inline limit travel by reference; where the
  serialize step refuses them, the figures say so under "outcomes".
Latency is the engine's own (the execution's startDate to stopDate); executions/s is over the wall time of a
run; `aws_cpu_ms_per_execution` is the CPU time (user + system) the local AWS process spent per execution,
`endpoint_cpu_ms_per_execution` the endpoint's and `client_cpu_ms_per_execution` this process's.
After one warm-up pass of each set, repeats each run and reports medians; records the machine's load; writes
bench/results/workflow.json.
"""

import argparse
import collections
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402
from local import aws  # noqa: E402
from local.__main__ import free_port  # noqa: E402
from local.assembly import read_assembly  # noqa: E402
from local.deploy import LocalDeployment  # noqa: E402
from local.endpoint import CaptureSpec, EndpointSpec, spec_to_json  # noqa: E402
from local.executions import percentile, run_executions  # noqa: E402
from local.services import BackgroundService  # noqa: E402
from training import etl, fit  # noqa: E402
from training.etl import SHARED_ARCHIVE  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "workflow.json"
PHOTOS = SHARED_ARCHIVE.parent / "real-photos-dev"
PHOTO_BYTES = (100_000, 3_000_000)
CONCURRENCY = (1, 8)
ENDPOINT = "scones-dev"
GOALS = {  # issue 20, on the photos
    "photos engine_concurrency_1 p50_ms": ("<=", 150.0),
    "photos engine_concurrency_8 executions_per_s": (">=", 40.0),
}


def latency_figures(latencies_ms: list[float], wall_seconds: float) -> dict:
    return {
        "p50_ms": round(percentile(latencies_ms, 0.5), 1),
        "p99_ms": round(percentile(latencies_ms, 0.99), 1),
        "executions_per_s": round(len(latencies_ms) / wall_seconds, 1),
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def engine_run(state_machine: str, bucket: str, keys: list[str], concurrency: int, pids: dict[str, int]) -> dict:
    """`pids`: the processes whose CPU time per execution is reported, by name ("aws", "endpoint")."""
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before, started = time.process_time(), time.perf_counter()
    executions = run_executions(state_machine, bucket, keys, concurrency, progress=False)
    wall, client = time.perf_counter() - started, time.process_time() - client_before
    cpu = {f"{name}_cpu_ms_per_execution": cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    latencies = [(e["stopDate"] - e["startDate"]).total_seconds() * 1000 for e in executions]
    outcomes = collections.Counter(e.get("error") or e["status"] for e in executions)
    return {
        **latency_figures(latencies, wall),
        **{figure: round(1000 * seconds / len(keys), 1) for figure, seconds in cpu.items()},
        "client_cpu_ms_per_execution": round(1000 * client / len(keys), 1),
        "outcomes": dict(sorted(outcomes.items())),
    }


def chained_run(bucket: str, keys: list[str]) -> dict:
    """The three handlers called directly in this process, in a loop: what the engine adds is the rest."""
    sys.path.insert(0, str(ROOT / "lambdas"))
    from classify_image import index as classify
    from filter_inferences import index as filter_step
    from serialize_image_data import index as serialize

    latencies, outcomes = [], collections.Counter()
    started = time.perf_counter()
    for key in keys:
        begun = time.perf_counter()
        # the filter prints its EMF line to stdout, as in Lambda; the bench has no use for it
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                body = classify.handler(serialize.handler({"s3_bucket": bucket, "s3_key": key}, None), None)
                filter_step.handler(body, None)
                outcomes["SUCCEEDED"] += 1
            except Exception as error:  # a named error is an execution's outcome, as in the engine's runs
                outcomes[type(error).__name__] += 1
        latencies.append((time.perf_counter() - begun) * 1000)
    return {**latency_figures(latencies, time.perf_counter() - started), "outcomes": dict(sorted(outcomes.items()))}


def upload_photos(bucket: str, folder: Path) -> list[str]:
    """The photos of PHOTO_BYTES in `folder` (as its SOURCES.tsv lists them) under photos/ in the bucket."""
    low, high = PHOTO_BYTES
    lines = (folder / "SOURCES.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
    files = sorted(row["file"] for row in rows if low <= int(row["bytes"]) <= high)
    s3 = boto3.client("s3")
    for name in files:
        s3.upload_file(str(folder / name), bucket, f"photos/{name}")
    return [f"photos/{name}" for name in files]


def medians_of(runs: dict[str, list[dict]]) -> dict:
    return {
        name: {
            figure: round(statistics.median(run[figure] for run in repeats), 1)
            for figure in repeats[0]
            if isinstance(repeats[0][figure], (int, float))
        }
        for name, repeats in runs.items()
    }


def goals_met(medians: dict) -> dict:
    met = {}
    for goal, (sense, bound) in GOALS.items():
        image_set, run, figure = goal.split()
        value = medians[image_set][run][figure]
        within = value <= bound if sense == "<=" else value >= bound
        met[goal] = {"value": value, "goal": f"{sense} {bound}", "met": within}
    return met


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, help="model.tar.gz to serve (default: .scones/model, else train one)")
    parser.add_argument("--photos", type=Path, default=PHOTOS, help=f"real photos with SOURCES.tsv (default {PHOTOS})")
    args = parser.parse_args(argv)
    assembly = ROOT / "cdk.out"
    if not (assembly / "manifest.json").exists():
        sys.exit("no cdk.out: run `make synth` first")
    work = Path(tempfile.mkdtemp(prefix="workflow-bench-"))
    model = args.model or ROOT / ".scones" / "model" / "model.tar.gz"
    load_before = os.getloadavg()
    runtime_url = f"http://127.0.0.1:{free_port()}"
    local_aws, endpoint = BackgroundService("aws", work), BackgroundService("endpoint", work)
    try:
        info = local_aws.start(
            ["-m", "local.aws", "--port", str(free_port())], env={"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": runtime_url}
        )
        os.environ.update(aws.client_environment(info["url"]))
        deployment = LocalDeployment()
        stacks = {stack.name: stack for stack in read_assembly(assembly)}
        deployment.deploy(stacks["SconesDevData"])
        bucket = deployment.created("SconesDevData", "AWS::S3::Bucket")["Data666C94C7"]["Ref"]
        source = os.environ.get("SCONES_CIFAR100") or SHARED_ARCHIVE
        etl.stage(source, work / "data", bucket=bucket, progress=False)
        keys = {
            "cifar": [line.split("\t")[2] for line in (work / "data" / "test.lst").read_text().splitlines()],
            "photos": upload_photos(bucket, args.photos),
        }
        if not model.exists():
            # The 32-px network of the two classes: confident on most CIFAR images, so that executions take both paths.
            model = fit.fit_local(work / "data", work / "model", architecture="resnet9", epochs=10)
        spec = EndpointSpec(name=ENDPOINT, model_data=model, capture=CaptureSpec(f"s3://{bucket}/data_capture"))
        (work / "endpoint-spec.json").write_text(json.dumps({"endpoints": [spec_to_json(spec)]}))
        endpoint_args = ["--spec", str(work / "endpoint-spec.json"), "--spool-dir", str(work / "spool")]
        endpoint_info = endpoint.start(
            ["-m", "local.endpoint", *endpoint_args, "--port", runtime_url.rsplit(":", 1)[1]]
        )
        pids = {"aws": info["pid"], "endpoint": endpoint_info["pid"]}
        deployment.deploy(stacks["SconesDevWorkflow"])
        for function in boto3.client("lambda").list_functions()["Functions"]:  # for the handlers chained here
            os.environ.update(function.get("Environment", {}).get("Variables", {}))
        os.environ["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"] = runtime_url
        machine = next(
            m["Ref"]
            for m in deployment.created("SconesDevWorkflow", "AWS::StepFunctions::StateMachine").values()
            if m["Name"].endswith("-classify-image")
        )
        runs = {}
        for image_set, image_keys in keys.items():
            engine_run(machine, bucket, image_keys, max(CONCURRENCY), pids)  # warm-up: first clients, handlers, caches
            runs[image_set] = {
                f"engine_concurrency_{c}": [
                    engine_run(machine, bucket, image_keys, c, pids) for _ in range(args.repeats)
                ]
                for c in CONCURRENCY
            }
            runs[image_set]["handlers_chained"] = [chained_run(bucket, image_keys) for _ in range(args.repeats)]
    finally:
        endpoint.stop()
        local_aws.stop()

    medians = {image_set: medians_of(set_runs) for image_set, set_runs in runs.items()}
    result = {
        "what": "the synthesized classify-image state machine on the local engine (moto's Step Functions engine "
        "with this repository's fixes, the handlers in-process), the local AWS and the local endpoint (capture on) "
        "each in its own process as in make run; and the same handlers chained directly",
        "command": "bench/workflow.py",
        "images": {
            "cifar": f"{len(keys['cifar'])} CIFAR-100 test images of bicycle and motorcycle (32x32 PNG)",
            "photos": f"{len(keys['photos'])} real photos of {PHOTO_BYTES[0]:,} to {PHOTO_BYTES[1]:,} bytes from "
            f"{args.photos.name}",
        },
        "model": str(model),
        "repeats": args.repeats,
        "medians": medians,
        "engine_overhead_ms_p50": {
            image_set: round(m["engine_concurrency_1"]["p50_ms"] - m["handlers_chained"]["p50_ms"], 1)
            for image_set, m in medians.items()
        },
        "goals": goals_met(medians),
        "runs": runs,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: result[key] for key in ("medians", "engine_overhead_ms_p50", "goals")}, indent=2))


if __name__ == "__main__":
    main()
