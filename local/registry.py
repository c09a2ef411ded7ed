"""The model registry on this machine: the model `up` trained goes through the synthesized evaluation gate and
registration into moto's model package group, is approved, and the synthesized approval state machine records it
in SSM, where the endpoint stack and the filter read it, as on AWS (stacks/registry.py).

moto cannot run the training job, so the training definition runs from the state after its SageMaker job states,
on the job description SageMaker would answer: the artifact, and the final metrics its metric definitions read
from train.py's lines. moto emits no SageMaker events either: after approving the package (on AWS a person does,
or `-c auto_approve=true`), `up` starts the approval state machine with the event EventBridge would deliver.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import boto3

from local import aws
from local.assembly import ACCOUNT, REGION
from local.classify import DEPLOYED_FILE
from local.executions import run_execution
from local.services import BackgroundService
from stacks.config import SconesConfig

SAGEMAKER_JOB_STATES = ":states:::sagemaker:"  # the optimized integrations moto cannot run (the job, its model)
METADATA_FIGURES = ("test_accuracy", "accepted_accuracy", "coverage", "neither_accepted", "threshold")


class RegistryError(RuntimeError):
    """The trained model was not registered or not recorded; the message says why and what to do."""


def gate_definition(training: dict) -> dict:
    """The training definition from the state after its SageMaker job states: the gate and the registration.
    (What comes before the job, keeping the labels channel, is for the job only.)"""
    states = training["States"]
    start = training["StartAt"]
    while SAGEMAKER_JOB_STATES not in states[start].get("Resource", ""):
        start = states[start]["Next"]
    while SAGEMAKER_JOB_STATES in states[start].get("Resource", ""):
        start = states[start]["Next"]
    reachable, pending = {}, [start]
    while pending:
        name = pending.pop()
        if name in reachable:
            continue
        state = reachable[name] = states[name]
        pending += [state[key] for key in ("Next", "Default") if key in state]
        pending += [branch["Next"] for branch in state.get("Choices", []) + state.get("Catch", [])]
    return {"StartAt": start, "States": reachable}


def job_description(training: dict, job_name: str, model_url: str, settings: dict, metrics: dict) -> dict:
    """What describeTrainingJob answers once the job completed: its artifact and its final metrics, each read
    by the definition's metric definitions from the lines train.py prints (`training.train.write_model`)."""
    from training.calibration import gate_lines  # torch: imported when a model is registered, not at start

    (job_state,) = [state for state in training["States"].values() if "createTrainingJob" in state.get("Resource", "")]
    definitions = job_state["Parameters"]["AlgorithmSpecification"].get("MetricDefinitions", [])
    log = "\n".join(gate_lines(settings, metrics))
    now = datetime.now(UTC).isoformat()
    final = [
        {"MetricName": definition["Name"], "Value": float(found.group(1)), "Timestamp": now}
        for definition in definitions
        if (found := re.search(definition["Regex"], log))
    ]
    return {
        "TrainingJobName": job_name,
        "TrainingJobStatus": "Completed",
        "ModelArtifacts": {"S3ModelArtifacts": model_url},
        **({"FinalMetricDataList": final} if final else {}),
    }


def packages(sagemaker, group: str) -> list[dict]:
    """The group's package descriptions, oldest first."""
    summaries = []
    for page in sagemaker.get_paginator("list_model_packages").paginate(ModelPackageGroupName=group):
        summaries += page["ModelPackageSummaryList"]
    described = [sagemaker.describe_model_package(ModelPackageName=s["ModelPackageArn"]) for s in summaries]
    return sorted(described, key=lambda package: package.get("ModelPackageVersion", 0))


def model_url_of(package: dict) -> str:
    return package["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]


def approval_event(package: dict) -> dict:
    """The "SageMaker Model Package State Change" event EventBridge delivers: the package's description."""
    detail = {
        key: value.isoformat() if isinstance(value, datetime) else value
        for key, value in package.items()
        if key != "ResponseMetadata"
    }
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "SageMaker Model Package State Change",
        "source": "aws.sagemaker",
        "account": ACCOUNT,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": REGION,
        "resources": [package["ModelPackageArn"]],
        "detail": detail,
    }


def label(package: dict) -> str:
    """`scones-dev/1 Approved`"""
    return f"{package['ModelPackageArn'].split('/', 1)[1]} {package['ModelApprovalStatus']}"


def _machine(machines: dict[str, dict], suffix: str) -> str:
    return next(machine["Ref"] for machine in machines.values() if machine["Name"].endswith(suffix))


def register_and_serve(
    deployment, training_stack: str, env_name: str, model_url: str, settings: dict, metrics_file: Path, say
) -> dict:
    """Register the model at `model_url` (models/<job>/output/model.tar.gz; its model.json `settings`, its
    metrics.json `metrics_file`) through the deployed training definition's gate, or reuse the package that holds
    it, approve it, and record it in SSM with the deployed approval state machine. Answers the served package's
    description; raises RegistryError if the model is below the gate or nothing was recorded."""
    from training import registry as training_registry  # the approval of `fit approve`; slow to import

    sagemaker, stepfunctions = boto3.client("sagemaker"), boto3.client("stepfunctions")
    machines = deployment.created(training_stack, "AWS::StepFunctions::StateMachine")
    training_arn, approval_arn = _machine(machines, "-training"), _machine(machines, "-approval")
    group = SconesConfig(env_name=env_name).model_package_group_name

    held = [package for package in packages(sagemaker, group) if model_url_of(package) == model_url]
    if held:
        package = held[-1]
        say(
            "registry",
            f"reusing {package['ModelPackageArn']} ({package['ModelApprovalStatus']}), which holds this model",
        )
    else:
        described = stepfunctions.describe_state_machine(stateMachineArn=training_arn)
        training = json.loads(described["definition"])
        gate_arn = _gate_machine(stepfunctions, described, gate_definition(training))
        job_name = model_url.split("/models/", 1)[1].split("/", 1)[0]
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        job = job_description(training, job_name, model_url, settings, metrics)
        execution = run_execution(stepfunctions, gate_arn, job, timeout=60)
        if execution["status"] != "SUCCEEDED":
            cause = execution.get("cause") or ""
            setting = found.group(1) if (found := re.search(r"\((gate_\w+)\)", cause)) else "<gate setting>"
            raise RegistryError(
                "the trained model was not registered, and nothing was recorded for the endpoint: "
                f"{execution.get('error')}: {cause}. The model report shows its figures; the floors are "
                f'settings: `make run CONTEXT="-c {setting}=<value>"` runs with another'
            )
        arn = json.loads(execution["output"])["ModelPackageArn"]
        package = sagemaker.describe_model_package(ModelPackageName=arn)
        say("registry", f"registered {arn} ({package['ModelApprovalStatus']}) past the evaluation gate")
    if package["ModelApprovalStatus"] != training_registry.APPROVED:
        package = training_registry.approve(env_name, package=package["ModelPackageArn"], sagemaker=sagemaker)
        say(
            "registry",
            f"approved {package['ModelPackageArn']} locally: on AWS a person approves it "
            "(python -m training.fit approve), or deploy with -c auto_approve=true",
        )
    execution = run_execution(stepfunctions, approval_arn, approval_event(package), timeout=60)
    if execution["status"] != "SUCCEEDED" or "ModelDataUrl" not in json.loads(execution.get("output") or "{}"):
        raise RegistryError(
            f"the approval state machine did not record {package['ModelPackageArn']}: {execution['status']} "
            f"{execution.get('error') or ''} {execution.get('cause') or execution.get('output') or ''}".strip()
        )
    say("registry", f"the approval state machine recorded {package['ModelPackageArn']} for the endpoint in SSM")
    return package


def _gate_machine(stepfunctions, training: dict, definition: dict) -> str:
    """A state machine of the gate's states beside the training one (`<name>-gate`), created or updated."""
    name = f"{training['name']}-gate"
    arn = training["stateMachineArn"].rsplit(":", 1)[0] + f":{name}"
    text = json.dumps(definition)
    try:
        stepfunctions.describe_state_machine(stateMachineArn=arn)
        stepfunctions.update_state_machine(stateMachineArn=arn, definition=text, roleArn=training["roleArn"])
    except stepfunctions.exceptions.StateMachineDoesNotExist:
        stepfunctions.create_state_machine(name=name, definition=text, roleArn=training["roleArn"])
    return arn


# ------------------------------------------------------------------------------------------ the listing


def listing(sagemaker, ssm, env_name: str) -> list[dict]:
    """The group's packages as rows: version, status, created, the gate's figures, the model, whether it serves
    (the package the approval recorded in SSM)."""
    config = SconesConfig(env_name=env_name)
    try:
        serving = ssm.get_parameter(Name=config.model_package_parameter_name)["Parameter"]["Value"]
    except ssm.exceptions.ParameterNotFound:
        serving = None
    return [
        {
            "version": package.get("ModelPackageVersion"),
            "status": package["ModelApprovalStatus"],
            "created": package["CreationTime"].strftime("%Y-%m-%d %H:%M:%S"),
            "metrics": package.get("CustomerMetadataProperties", {}),
            "model": model_url_of(package),
            "arn": package["ModelPackageArn"],
            "serving": package["ModelPackageArn"] == serving,
        }
        for package in packages(sagemaker, config.model_package_group_name)
    ]


def format_listing(group: str, rows: list[dict]) -> str:
    if not rows:
        return f"{group}: no package yet (`make run` registers the model it trains)"
    header = ["version", "status", "created", *(name.replace("_", " ") for name in METADATA_FIGURES), ""]
    table = [
        [
            str(row["version"]),
            row["status"],
            row["created"],
            *(_figure(row["metrics"].get(name)) for name in METADATA_FIGURES),
            "serving" if row["serving"] else "",
        ]
        for row in rows
    ]
    widths = [max(len(line[column]) for line in [header, *table]) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *table]
    ]
    return f"{group}: {len(rows)} package{'s' if len(rows) > 1 else ''}\n  " + "\n  ".join(lines)


def _figure(text: str | None) -> str:
    if text is None:
        return "-"
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


def show(state_dir: Path, env_name: str | None) -> str:
    """`python -m local registry`: the listing of the registry of the local AWS `up` started."""
    running = BackgroundService("aws", state_dir).info()
    if not running:
        raise RegistryError(f"no local AWS runs for {state_dir}: `make run` (python -m local up) starts it")
    if env_name is None:
        try:
            env_name = json.loads((state_dir / DEPLOYED_FILE).read_text())["env"]
        except (OSError, ValueError, KeyError):
            env_name = "dev"
    os.environ.update(aws.client_environment(running["url"]))
    sagemaker, ssm = boto3.client("sagemaker"), boto3.client("ssm")
    group = SconesConfig(env_name=env_name).model_package_group_name
    try:
        sagemaker.describe_model_package_group(ModelPackageGroupName=group)
    except sagemaker.exceptions.ClientError:
        raise RegistryError(f"the local AWS holds no registry {group}: `make run` deploys it") from None
    return format_listing(group, listing(sagemaker, ssm, env_name))
