"""Time the synthesized classification workflow on the local engine: `.venv/bin/python bench/workflow.py`.

Needs `make synth` (cdk.out) and a trained model (`make run` leaves one in .scones/model; otherwise a
10-epoch model of the two classes is trained here, confident on most images, so that executions take
both paths). Stages the real bicycle/motorcycle test images into a local bucket, serves the model with
the local endpoint (data capture on), then runs the 100 test images through the synthesized state
machine on moto's engine one at a time and 8 at a time, and through the same three handlers chained
directly in a loop. Repeats each REPEATS times and reports medians; writes
bench/results/workflow.json.
"""

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from local import aws  # noqa: E402
from local.assembly import read_assembly  # noqa: E402
from local.deploy import LocalDeployment  # noqa: E402
from local.endpoint import CaptureSpec, EndpointServer, EndpointSpec  # noqa: E402
from local.executions import percentile, run_executions  # noqa: E402
from stacks.workflow_stack import METRIC_NAMESPACE  # noqa: E402
from training import etl, fit  # noqa: E402
from training.etl import SHARED_ARCHIVE  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "workflow.json"
REPEATS = 3
CONCURRENCY = (1, 8)


def latency_figures(latencies_ms: list[float], wall_seconds: float) -> dict:
    return {
        "p50_ms": round(percentile(latencies_ms, 0.5), 1),
        "p99_ms": round(percentile(latencies_ms, 0.99), 1),
        "executions_per_s": round(len(latencies_ms) / wall_seconds, 1),
    }


def engine_run(state_machine: str, bucket: str, keys: list[str], concurrency: int) -> dict:
    started = time.perf_counter()
    executions = run_executions(state_machine, bucket, keys, concurrency, progress=False)
    wall = time.perf_counter() - started
    latencies = [(e["stopDate"] - e["startDate"]).total_seconds() * 1000 for e in executions]
    return latency_figures(latencies, wall)


def chained_run(bucket: str, keys: list[str]) -> dict:
    """The three handlers called directly, in a loop: what the engine adds is the rest."""
    sys.path.insert(0, str(ROOT / "lambdas"))
    from classify_image import index as classify
    from filter_inferences import index as filter_step
    from serialize_image_data import index as serialize

    latencies = []
    started = time.perf_counter()
    for key in keys:
        begun = time.perf_counter()
        body = classify.handler(serialize.handler({"s3_bucket": bucket, "s3_key": key}, None), None)
        # the filter prints its EMF line to stdout, as in Lambda; the bench has no use for it
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(filter_step.ThresholdConfidenceNotMet):
            filter_step.handler(body, None)
        latencies.append((time.perf_counter() - begun) * 1000)
    return latency_figures(latencies, time.perf_counter() - started)


def main() -> None:
    assembly = ROOT / "cdk.out"
    if not (assembly / "manifest.json").exists():
        sys.exit("no cdk.out: run `make synth` first")
    work = Path(tempfile.mkdtemp(prefix="workflow-bench-"))
    model = ROOT / ".scones" / "model" / "model.tar.gz"
    server, _ = aws.start()
    deployment = LocalDeployment()
    stacks = {stack.name: stack for stack in read_assembly(assembly)}
    deployment.deploy(stacks["SconesDevData"])
    bucket = deployment.created("SconesDevData", "AWS::S3::Bucket")["Data666C94C7"]["Ref"]
    source = os.environ.get("SCONES_CIFAR100") or SHARED_ARCHIVE
    etl.stage(source, work / "data", bucket=bucket, progress=False)
    if not model.exists():
        model = fit.fit_local(work / "data", work / "model", epochs=10)  # confident on most images, as in make run
    capture = CaptureSpec(destination=f"s3://{bucket}/data_capture")
    with EndpointServer([EndpointSpec(name="scones-dev", model_data=model, capture=capture)]) as endpoint:
        os.environ["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"] = endpoint.url
        os.environ.update({"ENDPOINT_NAME": "scones-dev", "THRESHOLD": "0.93", "METRIC_NAMESPACE": METRIC_NAMESPACE})
        deployment.deploy(stacks["SconesDevWorkflow"])
        machine = next(
            m["Ref"]
            for m in deployment.created("SconesDevWorkflow", "AWS::StepFunctions::StateMachine").values()
            if m["Name"].endswith("-classify-image")
        )
        keys = [line.split("\t")[2] for line in (work / "data" / "test.lst").read_text().splitlines()]
        runs = {
            f"engine_concurrency_{c}": [engine_run(machine, bucket, keys, c) for _ in range(REPEATS)]
            for c in CONCURRENCY
        }
        runs["handlers_chained"] = [chained_run(bucket, keys) for _ in range(REPEATS)]
    server.stop()

    medians = {
        name: {figure: statistics.median(run[figure] for run in repeats) for figure in repeats[0]}
        for name, repeats in runs.items()
    }
    result = {
        "what": f"{len(keys)} real CIFAR-100 test images through the synthesized classify-image state machine "
        "on moto's engine with the local endpoint (capture on), and the same handlers chained directly",
        "model": str(model),
        "repeats": REPEATS,
        "medians": medians,
        "runs": runs,
        "engine_overhead_ratio_p50": round(
            medians["engine_concurrency_1"]["p50_ms"] / medians["handlers_chained"]["p50_ms"], 1
        ),
        "goal": "p50 under 150 ms per execution on the local engine",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average": os.getloadavg()},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"medians": medians, "engine_overhead_ratio_p50": result["engine_overhead_ratio_p50"]}, indent=2))


if __name__ == "__main__":
    main()
