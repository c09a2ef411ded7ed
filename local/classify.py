"""Classify your own photos through the local workflow: `python -m local classify PHOTO... [--prefix] [--json]`.

The photos are uploaded into the local bucket under `photos/<time>-<id>/`, then each is classified by one
execution of the classify state machine, or, with `--prefix` or a folder among them, all of them by one
execution of the classify-prefix batch over that prefix, whose result files (`batch_results/<map run>/`,
AWS's ResultWriter layout) are read back. Printed per photo: the class, the probabilities, accepted or not
and why, the execution's latency. The local services are brought up first, as `up` does, if they are not up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import boto3

from local import aws, review
from local.executions import run_execution
from local.services import BackgroundService
from stacks.config import IMAGE_SUFFIXES

DEPLOYED_FILE = "deployed.json"  # in the state folder: what `up` deployed into the running local AWS
UPLOAD_PREFIX = "photos/"
BATCH_TIMEOUT_SECONDS = 600


class ClassifyError(Exception):
    """The photos cannot be classified as asked; the message says what to do."""


WAITING = "waiting for review"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photos", nargs="+", type=Path, metavar="PHOTO", help="PNG or JPEG files, or folders of them")
    parser.add_argument(
        "--prefix",
        action="store_true",
        help="classify them all with one execution of the classify-prefix batch (the default when a folder is given)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the text")


# ------------------------------------------------------------------------------------- the deployment


def record_deployed(run, bucket: str, endpoints: list[str], model: dict, review_page: dict | None) -> dict:
    """Write deployed.json for the LocalRun `run` that brought the services up: what `classify` needs of the
    running local AWS, which keeps its state in memory (so the record holds while that process runs)."""
    machines = run.deployment.created(run.stack("Workflow"), "AWS::StepFunctions::StateMachine").values()
    deployed = {
        "env": run.env_name,
        "aws": run.aws.info(),
        "bucket": bucket,
        "endpoints": endpoints,
        "state_machines": {
            short: next((machine["Ref"] for machine in machines if machine["Name"].endswith(f"-{short}")), None)
            for short in ("classify-image", "classify-prefix")
        },
        "classes": model.get("classes"),
        "filter_threshold": filter_threshold(run.stacks[run.stack("Workflow")].template, model),
        "review": review_page,
    }
    (run.state_dir / DEPLOYED_FILE).write_text(json.dumps(deployed, indent=1) + "\n")
    return deployed


def running_deployment(state_dir: Path, env_name: str | None) -> dict | None:
    """deployed.json's record if the local AWS it names and the endpoint still run (and boto3 now reaches them),
    else None."""
    try:
        deployed = json.loads((state_dir / DEPLOYED_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    running = BackgroundService("aws", state_dir).info()
    if (
        not running
        or running["pid"] != deployed["aws"]["pid"]
        or env_name not in (None, deployed["env"])
        or (deployed["endpoints"] and not BackgroundService("endpoint", state_dir).info())
    ):
        return None
    os.environ.update(aws.client_environment(running["url"]))
    return deployed


def filter_threshold(workflow_template: dict, model: dict) -> dict:
    """The threshold the synthesized filter function applies: its THRESHOLD (`-c threshold`), else the model's own
    (which it reads from SSM), else its DEFAULT_THRESHOLD. {"value", "source"}; value None if it names none."""
    variables = next(
        (
            resource["Properties"].get("Environment", {}).get("Variables", {})
            for logical_id, resource in workflow_template.get("Resources", {}).items()
            if resource["Type"] == "AWS::Lambda::Function" and logical_id.startswith("FilterInferences")
        ),
        {},
    )
    if variables.get("THRESHOLD") not in (None, ""):
        return {"value": float(variables["THRESHOLD"]), "source": "override"}
    if model.get("threshold") is not None:
        return {"value": float(model["threshold"]), "source": "model"}
    default = variables.get("DEFAULT_THRESHOLD")
    return {"value": float(default) if default else None, "source": "default"}


# ------------------------------------------------------------------------------------------- photos


def collect(paths: list[Path]) -> tuple[list[tuple[Path, str]], bool]:
    """(photo, name under the upload prefix) for each file, and for each folder its PNG and JPEG files (at any
    depth, under the folder's name); and whether a folder was among them. Raises ClassifyError for a missing path
    or a folder without photos."""
    photos, names, folder_given = [], set(), False
    for path in paths:
        if path.is_dir():
            folder_given = True
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ClassifyError(f"{path} holds no {', '.join(IMAGE_SUFFIXES)} file: point at photos")
            files = [(p, f"{path.resolve().name}/{p.relative_to(path).as_posix()}") for p in found]
        elif path.is_file():
            files = [(path, path.name)]
        else:
            raise ClassifyError(f"{path} does not exist: pass PNG or JPEG files, or folders of them")
        for photo, name in files:
            # The batch's Choice matches lower-case suffixes only (*.png, *.jpg, *.jpeg).
            name = name[: len(name) - len(photo.suffix)] + photo.suffix.lower()
            unique, number = name, 1
            while unique in names:
                number += 1
                stem, dot, suffix = name.rpartition(".")
                unique = f"{stem}-{number}.{suffix}" if dot else f"{name}-{number}"
            names.add(unique)
            photos.append((photo, unique))
    return photos, folder_given


def upload(bucket: str, photos: list[tuple[Path, str]]) -> tuple[str, list[dict]]:
    """Upload under a new prefix; answers the prefix and one row per photo: {"photo", "s3_key", "bytes"}."""
    prefix = f"{UPLOAD_PREFIX}{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}/"
    s3 = boto3.client("s3")
    rows = []
    for photo, name in photos:
        s3.upload_file(str(photo), bucket, prefix + name)
        rows.append({"photo": str(photo), "s3_key": prefix + name, "bytes": photo.stat().st_size})
    return prefix, rows


# ----------------------------------------------------------------------------------------- outcomes


def _json(text):
    """A JSON document given as a string (as Step Functions gives inputs, outputs and causes), else the value."""
    if isinstance(text, str):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def reason_of(error: str | None, cause) -> str | None:
    """Why an execution failed: its cause's message (a Lambda error's errorMessage), else the error's name."""
    cause = _json(cause)
    message = cause.get("errorMessage") or cause.get("Cause") if isinstance(cause, dict) else cause
    return message or error


def answer_fields(inferences, classes: list[str] | None, output: dict | None = None) -> dict:
    """class (the most likely one, accepted or not: "neither" when 1 - sum is), probabilities by class name, and
    neither."""
    output = output or {}
    if not isinstance(inferences, list) or not inferences:
        return {"class": None, "probabilities": None, "neither": None}
    names = classes if classes and len(classes) == len(inferences) else [f"class {i}" for i in range(len(inferences))]
    neither = output.get("neither", round(max(0.0, 1 - sum(inferences)), 4))
    most_likely = "neither" if neither > max(inferences) else names[inferences.index(max(inferences))]
    return {
        "class": output.get("class") or most_likely,
        "probabilities": dict(zip(names, inferences, strict=True)),
        "neither": neither,
    }


def inferences_in_history(stepfunctions, execution_arn: str):
    """The last inferences a state of the execution answered (those the filter refused, for a failed one)."""
    events = stepfunctions.get_execution_history(executionArn=execution_arn, reverseOrder=True)["events"]
    for event in events:
        output = _json(event.get("stateExitedEventDetails", {}).get("output"))
        if isinstance(output, dict) and output.get("inferences"):
            return _json(output["inferences"])
    return None


def outcome_of_execution(row: dict, described: dict, deployed: dict, stepfunctions) -> dict:
    if described.get("waiting"):
        return {
            **row,
            **answer_fields(inferences_in_history(stepfunctions, described["executionArn"]), deployed.get("classes")),
            "status": "RUNNING",
            "latency_ms": None,
            "accepted": False,
            "error": WAITING,
            "reason": "uncertain: it waits for a person's answer (python -m local review, or the review page)",
        }
    latency = (described["stopDate"] - described["startDate"]).total_seconds() * 1000
    row = {**row, "status": described["status"], "latency_ms": round(latency, 1)}
    if described["status"] == "SUCCEEDED":
        output = _json(described.get("output")) or {}
        threshold = deployed["filter_threshold"]
        return {
            **row,
            **answer_fields(_json(output.get("inferences")), deployed.get("classes"), output),
            "accepted": True,
            "threshold": output.get("threshold", threshold["value"]),
            "threshold_source": output.get("threshold_source", threshold["source"]),
            "reason": None,
        }
    inferences = inferences_in_history(stepfunctions, described["executionArn"])
    return {
        **row,
        **answer_fields(inferences, deployed.get("classes")),
        "accepted": False,
        "error": described.get("error", described["status"]),
        "reason": reason_of(described.get("error", described["status"]), described.get("cause")),
    }


def classify_each(deployed: dict, rows: list[dict], concurrency: int) -> list[dict]:
    """One execution of the classify state machine per photo, `concurrency` at a time."""
    stepfunctions = boto3.client("stepfunctions")
    machine = deployed["state_machines"]["classify-image"]

    def one(row: dict) -> dict:
        described = run_execution(stepfunctions, machine, {"s3_bucket": deployed["bucket"], "s3_key": row["s3_key"]})
        return outcome_of_execution(row, described, deployed, stepfunctions)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, rows))


def _milliseconds(start, stop) -> float | None:
    def moment(value):
        if isinstance(value, int | float):
            return float(value)
        return datetime.fromisoformat(value).timestamp() if isinstance(value, str) else None

    begun, ended = moment(start), moment(stop)
    return round((ended - begun) * 1000, 1) if begun is not None and ended is not None else None


def outcome_of_item(entry: dict, deployed: dict, stepfunctions) -> tuple[str | None, dict]:
    """The s3_key and outcome of one entry of a SUCCEEDED_n/FAILED_n result file."""
    item, output = _json(entry.get("Input")) or {}, _json(entry.get("Output")) or {}
    key = item.get("Key") if isinstance(item, dict) else None
    fields = {"status": entry.get("Status"), "latency_ms": _milliseconds(entry.get("StartDate"), entry.get("StopDate"))}
    if entry.get("Status") != "SUCCEEDED":  # the item could not be classified at all
        reason = reason_of(entry.get("Error"), entry.get("Cause"))
        return key, {
            **fields,
            **answer_fields(None, None),
            "accepted": False,
            "error": entry.get("Error"),
            "reason": reason,
        }
    if output.get("skipped"):
        return output.get("s3_key", key), {**fields, **answer_fields(None, None), "accepted": False, "skipped": True}
    outcome = output.get("outcome", {})
    if outcome.get("status") == "SUCCEEDED":
        threshold = deployed["filter_threshold"]
        answer = answer_fields(_json(outcome.get("inferences")), deployed.get("classes"), outcome)
        extra = {"threshold": threshold["value"], "threshold_source": threshold["source"], "reason": None}
        return key, {**fields, **answer, "accepted": True, **extra}
    child = _json(outcome.get("Cause"))  # the child execution's description, as startExecution.sync:2 fails with
    if isinstance(child, dict) and child.get("Error"):
        error, reason = child["Error"], reason_of(child["Error"], child.get("Cause"))
        inferences = inferences_in_history(stepfunctions, child["ExecutionArn"]) if "ExecutionArn" in child else None
    else:
        error, reason = outcome.get("Error"), reason_of(outcome.get("Error"), outcome.get("Cause"))
        inferences = None
    answer = answer_fields(inferences, deployed.get("classes"))
    return key, {**fields, **answer, "accepted": False, "error": error, "reason": reason}


def classify_batch(deployed: dict, prefix: str, rows: list[dict]) -> tuple[dict, list[dict]]:
    """One execution of the classify-prefix batch over `prefix`; answers its summary and the rows completed from
    its result files."""
    stepfunctions, s3 = boto3.client("stepfunctions"), boto3.client("s3")
    machine = deployed["state_machines"].get("classify-prefix")
    if not machine:
        raise ClassifyError("the deployed workflow has no classify-prefix state machine: classify without --prefix")
    timeout = BATCH_TIMEOUT_SECONDS + 2 * len(rows)
    described = run_execution(stepfunctions, machine, {"prefix": prefix}, poll_seconds=0.1, timeout=timeout)
    batch = {
        "execution_arn": described["executionArn"],
        "status": described["status"],
        "latency_ms": round((described["stopDate"] - described["startDate"]).total_seconds() * 1000, 1),
    }
    if described["status"] != "SUCCEEDED":
        batch["reason"] = f"{described.get('error')}: {reason_of(described.get('error'), described.get('cause'))}"
    output = _json(described.get("output"))
    writer = output.get("ResultWriterDetails") if isinstance(output, dict) else None
    if not writer:
        batch["reason"] = (
            batch.get("reason") or "the batch wrote no result files (no ResultWriterDetails in its output)"
        )
        return batch, [{**row, "status": None, "accepted": False, "reason": "no result"} for row in rows]
    manifest = json.loads(s3.get_object(Bucket=writer["Bucket"], Key=writer["Key"])["Body"].read())
    batch["manifest"] = f"s3://{writer['Bucket']}/{writer['Key']}"
    outcomes: dict[str, dict] = {}
    counts = {}
    for status, files in manifest.get("ResultFiles", {}).items():
        counts[status.lower()] = 0
        for result_file in files:
            body = s3.get_object(Bucket=manifest.get("DestinationBucket", writer["Bucket"]), Key=result_file["Key"])
            for entry in json.loads(body["Body"].read() or b"[]"):
                counts[status.lower()] += 1
                key, outcome = outcome_of_item(entry, deployed, stepfunctions)
                outcomes[key] = outcome
    batch["items"] = counts
    missing = {"status": None, "accepted": False, "reason": "not in the batch's result files"}
    return batch, [{**row, **outcomes.get(row["s3_key"], missing)} for row in rows]


# ---------------------------------------------------------------------------------------------- print


def _accepted_text(row: dict) -> str:
    if row.get("skipped"):
        return "skipped by the batch (not a .png, .jpg or .jpeg key)"
    if row["accepted"]:
        source = {"model": "the model's", "override": "-c threshold", "default": "the default"}
        threshold = row.get("threshold")
        where = source.get(row.get("threshold_source"), row.get("threshold_source"))
        return f"accepted (threshold {threshold:.3g}, {where})" if threshold is not None else "accepted"
    return f"not accepted: {row.get('error') or row['status']}"


def print_rows(rows: list[dict]) -> None:
    width = max(len(Path(row["photo"]).name) for row in rows)
    for row in rows:
        latency = f"{row['latency_ms']:.0f} ms" if row.get("latency_ms") is not None else ""
        print(f"{Path(row['photo']).name:<{width}}  {row.get('class') or '-':<10}  {_accepted_text(row)}  {latency}")
        if row.get("probabilities"):
            print(
                " " * (width + 2)
                + "  ".join(f"{name} {p:.3f}" for name, p in row["probabilities"].items())
                + f"  neither {row['neither']:.3f}"
            )
        if not row["accepted"] and row.get("reason"):
            print(" " * (width + 2) + row["reason"])


def print_summary(rows: list[dict], bucket: str, prefix: str, batch: dict | None) -> None:
    accepted = sum(row["accepted"] for row in rows)
    refused: dict[str, int] = {}
    for row in rows:
        if not row["accepted"]:
            why = "skipped" if row.get("skipped") else row.get("error") or "no result"
            refused[why] = refused.get(why, 0) + 1
    why = ", ".join(f"{count} {error}" for error, count in refused.items())
    print(f"\n{len(rows)} photo(s): {accepted} accepted, {len(rows) - accepted} not" + (f" ({why})" if why else ""))
    print(f"uploaded to s3://{bucket}/{prefix}")
    if batch:
        items = ", ".join(f"{count} {status.upper()}" for status, count in batch.get("items", {}).items() if count)
        print(f"batch {batch['status']} in {batch['latency_ms']:.0f} ms" + (f"; items: {items}" if items else ""))
        if batch.get("manifest"):
            print(f"result files: {batch['manifest']}")
        if batch.get("reason"):
            print(f"batch: {batch['reason']}")


def run(args: argparse.Namespace, ensure_up) -> int:
    """The classify command. `ensure_up(state_dir, assembly_dir, env_name)` answers the deployed.json record of
    the running local services, bringing them up first if needed."""
    photos, folder_given = collect(args.photos)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        deployed = ensure_up(args.state_dir.resolve(), args.assembly.resolve(), args.env)
    started = time.perf_counter()
    prefix, rows = upload(deployed["bucket"], photos)
    batch = None
    # With review on, a batch runs until its last uncertain photo is answered: a folder goes photo by photo.
    if args.prefix or (folder_given and not deployed.get("review")):
        if deployed.get("review"):
            print("the batch ends once every uncertain photo is answered: python -m local review", file=sys.stderr)
        batch, rows = classify_batch(deployed, prefix, rows)
    else:
        rows = classify_each(deployed, rows, args.concurrency)
    if args.json:
        document = {"bucket": deployed["bucket"], "prefix": prefix, "batch": batch, "photos": rows}
        print(json.dumps({**document, "seconds": round(time.perf_counter() - started, 3)}, indent=1))
    else:
        print_rows(rows)
        print_summary(rows, deployed["bucket"], prefix, batch)
        if deployed.get("review") and any(row.get("error") == WAITING for row in rows):
            print(f"review them: {review.page_url(deployed['review'])}  (or: python -m local review)")
    return 0
