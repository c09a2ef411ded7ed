"""The whole scones workflow on this machine: `python -m local up` (make run) and `python -m local down` (make stop).

`up` runs what `cdk synth` wrote to cdk.out: it starts the local AWS (moto, in the background), stages
the CIFAR-100 data into the synthesized bucket, trains the model with the training module, deploys the
stacks, serves the endpoint with data capture and the review page, starts the state machine once per test image
and prints a summary. A second `up` reuses the running services, the staged data and the trained model.
`classify` (local/classify.py) runs one's own photos through what `up` brought up, bringing it up first if needed.
`review` (local/review.py) lists the photos waiting for a person and answers one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3

from local import aws, classify, registry, review
from local.assembly import AssemblyError, read_assembly
from local.deploy import LocalDeployment, UnresolvedReference
from local.executions import percentile, run_executions
from local.services import BackgroundService, ServiceFailed
from monitoring.captures import split_s3_uri
from stacks.config import stack_name
from training.etl import EtlError

DEFAULT_CONCURRENCY = 8
# Reported as `local: error: ...` (exit status 2), without a traceback.
USER_ERRORS = (
    OSError,
    ServiceFailed,
    UnresolvedReference,
    AssemblyError,
    EtlError,
    classify.ClassifyError,
    registry.RegistryError,
    review.ReviewError,
)
STACKS = ("Data", "Training", "Workflow", "Endpoint", "Monitoring")  # what `up` deploys, by short name


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


class LocalRun:
    """The steps of `up`, each timed into `self.timings`."""

    def __init__(self, state_dir: Path, assembly_dir: Path, env_name: str | None = None) -> None:
        """`env_name` None: the environment the assembly was synthesized for."""
        self.state_dir = state_dir
        self.timings: dict[str, float] = {}
        self.aws = BackgroundService("aws", state_dir)
        self.endpoint = BackgroundService("endpoint", state_dir)
        self.review = BackgroundService(review.SERVICE, state_dir)
        self.started: list[BackgroundService] = []  # by this run, to be stopped if it fails
        self.stacks = {stack.name: stack for stack in read_assembly(assembly_dir)}
        self.env_name = assembly_env(self.stacks.values(), assembly_dir, env_name)
        self.deployment = LocalDeployment()

    def timed(self, name: str, step, *args):
        started = time.perf_counter()
        result = step(*args)
        self.timings[name] = round(time.perf_counter() - started, 3)
        return result

    def start_aws(self) -> dict:
        info = self.aws.info()
        if info:
            say("aws", f"reusing the local AWS at {info['url']} (pid {info['pid']})")
        else:
            runtime_url = f"http://127.0.0.1:{free_port()}"
            info = self.aws.start(
                ["-m", "local.aws", "--port", str(free_port())], env={"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": runtime_url}
            )
            self.started.append(self.aws)
            say("aws", f"started the local AWS (moto, Step Functions engine, in-process Lambdas) at {info['url']}")
        os.environ.update(aws.client_environment(info["url"]))
        return info

    def deploy(self, stack_names: list[str]) -> LocalDeployment:
        for name in stack_names:
            self.deployment.deploy(self.stacks[name])
        return self.deployment

    def stack(self, short: str) -> str:
        return stack_name(self.env_name, short)

    def stage(self, bucket: str):
        from training import etl

        summary = etl.stage(etl.demo_source(), self.state_dir / "data", bucket=bucket, extra_classes=etl.ALL_OTHERS)
        say("data", summary.report().replace("\n", "; "))
        return summary

    def train(self, dataset_sha: str, bucket: str) -> str:
        from training import etl, fit, photo_check

        model_dir = self.state_dir / "model"
        stamp = model_dir / "trained-on.sha256"
        archive = model_dir / "model.tar.gz"
        if archive.exists() and stamp.exists() and stamp.read_text() == dataset_sha:
            say("train", f"reusing {archive} (trained on the same data)")
        else:
            say("train", "training the default recipe on this machine's CPU")
            photos = etl.SHARED_REAL_PHOTOS  # they only measure the model (its report and the summary show how)
            checked = photos if all((photos / label).is_dir() for label in photo_check.TARGETS) else None
            fit.fit_local(self.state_dir / "data", model_dir, check_photos=checked)
            stamp.write_text(dataset_sha)
        # Where the training stack's job would have put it: models/<job name>/output/model.tar.gz.
        key = f"models/local-{dataset_sha[:12]}/output/model.tar.gz"
        boto3.client("s3").upload_file(str(archive), bucket, key)
        return f"s3://{bucket}/{key}"

    def register(self, model_url: str) -> dict:
        """The trained model through the training stack's gate into the registry, approved and recorded in SSM."""
        self.deploy([self.stack("Training")])
        settings = model_settings(self.state_dir / "model" / "model.tar.gz")
        metrics = self.state_dir / "model" / "metrics.json"
        return registry.register_and_serve(
            self.deployment, self.stack("Training"), self.env_name, model_url, settings, metrics, say
        )

    def capture_report(self, bucket: str, endpoint: str, filter_threshold: float | None = None) -> Path:
        """The monitoring report over this endpoint's captures, against the trained model's baseline."""
        from monitoring.__main__ import main as monitoring

        baseline, out = self.state_dir / "model" / "baseline", self.state_dir / "report"
        if (
            not (baseline / "constraints.json").exists()
            or (baseline / "constraints.json").stat().st_mtime
            < (self.state_dir / "model" / "model.tar.gz").stat().st_mtime
        ):
            monitoring(
                [
                    "baseline",
                    "--model",
                    str(self.state_dir / "model" / "model.tar.gz"),
                    "--data",
                    str(self.state_dir / "data"),
                    "--out",
                    str(baseline),
                ]
            )
        monitoring(
            [
                "report",
                f"s3://{bucket}/data_capture/{endpoint}/",
                "--baseline",
                str(baseline),
                "--out",
                str(out),
                "--no-progress",
                "--reviews",
                f"s3://{bucket}/reviews/",
                *(["--filter-threshold", str(filter_threshold)] if filter_threshold is not None else []),
            ]
        )
        return out / "report.html"

    def serve_endpoint(self, deployment: LocalDeployment, runtime_url: str) -> list[str]:
        from local.endpoint import CaptureSpec, EndpointSpec, spec_to_json

        resources = deployment.report.sagemaker
        specs = []
        for name, endpoint in resources.get("Endpoint", {}).items():
            config = resources["EndpointConfig"][endpoint["EndpointConfigName"]]
            variant = config["ProductionVariants"][0]
            model = resources["Model"][variant["ModelName"]]
            model_url = model["PrimaryContainer"]["ModelDataUrl"]
            bucket, key = split_s3_uri(model_url)
            local_model = self.state_dir / "endpoint" / name / "model.tar.gz"
            local_model.parent.mkdir(parents=True, exist_ok=True)
            boto3.client("s3").download_file(bucket, key, str(local_model))
            capture = CaptureSpec.from_data_capture_config(config.get("DataCaptureConfig"))
            specs.append(EndpointSpec(name=name, model_data=local_model, capture=capture))
        spec_file = self.state_dir / "endpoint-spec.json"
        spec_json = json.dumps({"endpoints": [spec_to_json(spec) for spec in specs]}, indent=1)
        if self.endpoint.info() and spec_file.exists() and spec_file.read_text() == spec_json:
            say("endpoint", f"reusing the endpoint server at {runtime_url}")
        else:
            self.endpoint.stop()
            spec_file.write_text(spec_json)
            port = runtime_url.rsplit(":", 1)[1]
            self.endpoint.start(
                [
                    "-m",
                    "local.endpoint",
                    "--spec",
                    str(spec_file),
                    "--port",
                    port,
                    "--spool-dir",
                    str(self.state_dir / "capture-spool"),
                ]
            )
            self.started.append(self.endpoint)
            say("endpoint", f"serving {', '.join(spec.name for spec in specs)} at {runtime_url} with data capture")
        return [spec.name for spec in specs]

    def stop_started(self) -> None:
        """After a failure: stop the services this run started. Those an earlier run started stay up for reuse."""
        for service in reversed(self.started):
            if service.stop():
                say(service.name, "stopped: this run started it and failed")
        if self.aws.info() or self.endpoint.info():
            say("stop", "the services an earlier run started are still up for the next one; `make stop` stops them")


def assembly_env(stacks, assembly_dir: Path, requested: str | None) -> str:
    """The environment whose stacks `up` deploys: the requested one, else the one the assembly holds (app.py tags
    each stack with it). Raises AssemblyError, saying what to do, if the assembly lacks some of its stacks."""
    held = sorted({stack.tags["environment"] for stack in stacks if "environment" in stack.tags})
    if requested is None and len(held) > 1:
        raise AssemblyError(f"{assembly_dir} holds the stacks of {' and '.join(held)}: pass --env")
    env_name = requested or (held[0] if held else "dev")
    missing = [stack_name(env_name, short) for short in STACKS]
    missing = [name for name in missing if name not in {stack.name for stack in stacks}]
    if not missing:
        return env_name
    synth = "make synth" if env_name == "dev" else f'make synth CONTEXT="-c env={env_name}"'
    if held and env_name not in held:
        holds = " and ".join(f"Scones{env.title()}*" for env in held)
        raise AssemblyError(
            f"{assembly_dir} holds {holds}, not the {env_name} stacks: pass "
            f"{' or '.join(f'--env {env}' for env in held)}, or run `{synth}` to synthesize them"
        )
    raise AssemblyError(f"{assembly_dir} has no {', '.join(missing)}: run `{synth}` to synthesize them")


def summarise(executions: list[dict], labels: dict[str, int], metrics: dict, captured: int) -> dict:
    succeeded = [e for e in executions if e["status"] == "SUCCEEDED"]
    waiting = [e for e in executions if e.get("waiting")]
    failed: dict[str, int] = {}
    for execution in executions:
        if execution["status"] not in ("SUCCEEDED", "RUNNING"):
            error = execution.get("error") or execution["status"]
            failed[error] = failed.get(error, 0) + 1
    correct = 0
    for execution in succeeded:
        inferences = json.loads(execution["output"])["inferences"]
        correct += inferences.index(max(inferences)) == labels[execution["key"]]
    latencies = [(e["stopDate"] - e["startDate"]).total_seconds() * 1000 for e in executions if "stopDate" in e]
    return {
        "model_test_accuracy": metrics.get("test", {}).get("accuracy"),
        "model_real_photos": real_photo_figures(metrics.get("real_photos")),
        "executions": len(executions),
        "succeeded": len(succeeded),
        "waiting_for_review": len(waiting),
        "failed_by_error": failed,
        "accepted_accuracy": round(correct / len(succeeded), 4) if succeeded else None,
        "latency_ms_p50": round(percentile(latencies, 0.5), 1),
        "latency_ms_p99": round(percentile(latencies, 0.99), 1),
        "captured_records": captured,
    }


def count_captured(bucket: str, prefix: str) -> int:
    s3 = boto3.client("s3")
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            count += len(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read().splitlines())
    return count


def up(state_dir: Path, assembly_dir: Path, env_name: str | None, concurrency: int) -> dict:
    state_dir.mkdir(parents=True, exist_ok=True)
    run = LocalRun(state_dir, assembly_dir, env_name)
    say("assembly", f"the {run.env_name} stacks of {assembly_dir}")
    try:
        return run_up(run, concurrency)
    except BaseException:
        run.stop_started()
        raise


def run_up(run: LocalRun, concurrency: int) -> dict:
    state_dir = run.state_dir
    deployed = bring_up(run)
    bucket, endpoints, info = deployed["bucket"], deployed["endpoints"], deployed["aws"]
    test_lines = (state_dir / "data" / "test.lst").read_text().splitlines()
    labels = {line.split("\t")[2]: int(line.split("\t")[1]) for line in test_lines}
    state_machine = deployed["state_machines"]["classify-image"]
    say("run", f"starting {len(labels)} executions of {state_machine.rsplit(':', 1)[1]}, {concurrency} at a time")
    executions = run.timed("executions", run_executions, state_machine, bucket, sorted(labels), concurrency)

    metrics_file = state_dir / "model" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    if endpoints:  # the endpoint uploads its spooled captures every 0.2 s: have the last ones uploaded now
        try:
            urllib.request.urlopen(
                urllib.request.Request(f"{info['sagemaker_runtime']}/local/upload-captures", data=b"", method="POST"),
                timeout=60,
            ).close()
        except urllib.error.URLError as error:
            say(
                "capture",
                f"the endpoint did not upload its last captures ({error}); they follow within a second "
                "while it runs, or when `make stop` stops it",
            )
    captured = count_captured(bucket, f"data_capture/{endpoints[0]}/") if endpoints else 0
    summary = summarise(executions, labels, metrics, captured)
    summary["filter_threshold"], summary["model_package"] = deployed["filter_threshold"], deployed["package"]
    summary["review_page"] = review.page_url(deployed["review"]) if deployed["review"] else None
    if endpoints:
        report = run.timed("report", run.capture_report, bucket, endpoints[0], deployed["filter_threshold"]["value"])
        summary["capture_report"] = str(report)
    summary["timings_s"] = run.timings
    (state_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, bucket, endpoints, state_dir)
    return summary


def bring_up(run: LocalRun) -> dict:
    """Everything `up` runs before its executions: the local AWS, the staged data, the trained model, the deployed
    stacks and the endpoint. Answers what it recorded in the state folder's deployed.json."""
    info = run.timed("aws", run.start_aws)
    deployment = run.timed("deploy_data", run.deploy, [run.stack("Data")])
    bucket = next(
        bucket["Ref"]
        for logical_id, bucket in deployment.created(run.stack("Data"), "AWS::S3::Bucket").items()
        if logical_id.startswith("Data")
    )
    staged = run.timed("stage", run.stage, bucket)
    dataset_sha = hashlib.sha256(json.dumps(staged.dataset["files"], sort_keys=True).encode()).hexdigest()
    model_url = run.timed("train", run.train, dataset_sha, bucket)
    say("train", f"model at {model_url}")
    package = run.timed("registry", run.register, model_url)
    # The review stack (absent with -c review=false) holds the queue the workflow sends uncertain answers to.
    stacks = [run.stack(name) for name in ("Review", "Workflow", "Endpoint", "Monitoring")]
    run.timed("deploy", run.deploy, [name for name in stacks if name in run.stacks])
    say("deploy", f"created {len(deployment.report.created)} resources; not emulated locally:")
    for line in deployment.report.not_emulated:
        print(f"         {line}")
    endpoints = run.timed("endpoint", run.serve_endpoint, deployment, info["sagemaker_runtime"])
    functions = [f["Ref"] for f in deployment.created(run.stack("Review"), "AWS::Lambda::Function").values()]
    page = run.timed("review", review.serve_page, run.review, functions, say, run.started)
    deployed = classify.record_deployed(
        run, bucket, endpoints, model_settings(run.state_dir / "model" / "model.tar.gz"), page
    )
    return {**deployed, "package": registry.label(package)}


def model_settings(archive: Path) -> dict:
    """The model.json inside a model.tar.gz ({} if it has none)."""
    with tarfile.open(archive) as tar:
        try:
            member = tar.extractfile("model.json")
        except KeyError:
            return {}
        return json.loads(member.read()) if member else {}


def ensure_up(state_dir: Path, assembly_dir: Path, env_name: str | None) -> dict:
    """What deployed.json records if its local AWS and the endpoint still run, else what `up` brings up."""
    if deployed := classify.running_deployment(state_dir, env_name):
        return deployed
    if not (assembly_dir / "manifest.json").exists():
        raise FileNotFoundError(f"no cloud assembly at {assembly_dir}: run `make synth` first")
    state_dir.mkdir(parents=True, exist_ok=True)
    run = LocalRun(state_dir, assembly_dir, env_name)
    say("assembly", f"the local services are not up: bringing up the {run.env_name} stacks of {assembly_dir}")
    try:
        return bring_up(run)
    except BaseException:
        run.stop_started()
        raise


def real_photo_figures(photos: dict | None) -> dict | None:
    """The headline of the model's check on real photos (training.photo_check), if the training made one."""
    if not photos:
        return None
    at = photos["at_model_threshold"]
    others = {folder: at[f"{folder}_accepted"] for folder in photos["photos"] if f"{folder}_accepted" in at}
    return {
        "folder": photos["folder"],
        "right": photos["right"],
        "accepted": at["accepted"],
        "accepted_right": at["accepted_right"],
        "others_accepted": others,
    }


def _share(value: float | None, spec: str = ".0%") -> str:
    return "n/a" if value is None else format(value, spec)


def _relative_to_cwd(path) -> str:
    """A path under the working directory as a relative one (`.scones/summary.json`), others as given."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_summary(summary: dict, bucket: str, endpoints: list[str], state_dir: Path) -> None:
    failed = ", ".join(f"{count} {error}" for error, count in summary["failed_by_error"].items()) or "none"
    outcomes = f"{summary['succeeded']} succeeded, {summary['waiting_for_review']} wait for review; failed: {failed}"
    accuracy = summary["model_test_accuracy"]
    photos = summary.get("model_real_photos")
    real_photos = (
        f"\n  model on real photos      {_share(photos['right'], '.3f')} right; {_share(photos['accepted'])} "
        f"accepted, {_share(photos['accepted_right'], '.1%')} of them right; "
        + ", ".join(f"{folder} {_share(share)}" for folder, share in photos["others_accepted"].items())
        + " accepted"
        if photos
        else ""
    )
    endpoint = endpoints[0] if endpoints else ""
    capture_report = (
        _relative_to_cwd(summary["capture_report"]) if "capture_report" in summary else "none (no endpoint)"
    )
    print(f"""
scones on this machine
  model test accuracy       {accuracy if accuracy is None else f"{accuracy:.3f}"}{real_photos}
  executions                {summary["executions"]}: {outcomes}
  accuracy of accepted      {summary["accepted_accuracy"]}
  execution latency         p50 {summary["latency_ms_p50"]} ms, p99 {summary["latency_ms_p99"]} ms
  captured records          {summary["captured_records"]} under s3://{bucket}/data_capture/{endpoint}
  model package (serving)   {summary["model_package"]}   (all of them: python -m local registry)
  model report              {_relative_to_cwd(state_dir / "model" / "report.html")}
  capture report            {capture_report}
  review page               {summary["review_page"] or "none (synthesized with -c review=false)"}
  summary                   {_relative_to_cwd(state_dir / "summary.json")}
  stop everything           make stop   (or: python -m local down)
""")


def down(state_dir: Path) -> None:
    for name in (review.SERVICE, "endpoint", "aws"):
        stopped = BackgroundService(name, state_dir).stop()
        print(f"{name}: {'stopped' if stopped else 'not running'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="run the whole workflow locally (make run)")
    classify_parser = commands.add_parser(
        "classify",
        help="classify your own photos through the local workflow",
        description=classify.__doc__.split("\n\n")[0],
    )
    review_parser = commands.add_parser(
        "review",
        help="list the photos waiting for a person, or answer one",
        description=review.__doc__.split("\n\n")[2],
    )
    review.add_arguments(review_parser)
    registry_parser = commands.add_parser("registry", help="list the local model registry's packages")
    registry_parser.add_argument("--env", help="the environment (default: the one `up` brought up)")
    down_parser = commands.add_parser("down", help="stop the local services (make stop)")
    for sub in (up_parser, classify_parser, down_parser, registry_parser, review_parser):
        sub.add_argument(
            "--state-dir", type=Path, default=Path(".scones"), help="where local state lives (default: %(default)s)"
        )
    for sub in (up_parser, classify_parser):
        sub.add_argument(
            "--assembly",
            type=Path,
            default=Path("cdk.out"),
            help="the synthesized cloud assembly (default: %(default)s)",
        )
        sub.add_argument("--env", help="the environment whose stacks to run (default: the one the assembly holds)")
        sub.add_argument(
            "--concurrency",
            type=positive_int,
            default=DEFAULT_CONCURRENCY,
            help="executions running at once (default: %(default)s)",
        )
    classify.add_arguments(classify_parser)
    args = parser.parse_args(argv)
    try:
        if args.command == "down":
            down(args.state_dir)
        elif args.command == "registry":
            print(registry.show(args.state_dir, args.env))
        elif args.command == "review":
            return review.run(args, lambda state_dir: BackgroundService(review.SERVICE, state_dir).info())
        elif args.command == "classify":
            return classify.run(args, ensure_up)
        else:
            if not (args.assembly / "manifest.json").exists():
                raise FileNotFoundError(f"no cloud assembly at {args.assembly}: run `make synth` first")
            up(args.state_dir.resolve(), args.assembly.resolve(), args.env, args.concurrency)
    except USER_ERRORS as error:
        print(f"local: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("local: interrupted", file=sys.stderr)
        return 130
    return 0


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


if __name__ == "__main__":
    sys.exit(main())
