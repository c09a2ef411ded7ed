"""Fit the model, on this machine or in SageMaker.

    python -m training.fit --local --data DIR --out DIR [--labels DIR] [--check-photos DIR] [hyperparameters]
    python -m training.fit --sagemaker [--env dev|prod] [--region R] [--algorithm pytorch|builtin]
    python -m training.fit approve [--package ARN | --latest] [--env dev|prod] [--region R]   (training/registry.py)

`--local` runs `training/train.py` on this machine exactly as SageMaker's PyTorch container runs it
(from a copy of the source directory, `training.sourcedir`; hyperparameters as arguments, data through the
`SM_CHANNEL_*` variables, all channels pointing at the staged data folder) and packs the model directory
into `OUT/model.tar.gz` the way SageMaker does; metrics.json, the plots and report.html (`training.report`)
land in OUT, each file only once complete. `--labels` is the training job's `labels` channel: a folder of
reviewed photos, `<class>/<photo>` (a copy of `s3://<bucket>/labels/`), learnt beside the staged data.
`--check-photos` then measures the model on a folder of labelled photos (training/photo_check.py).

`--sagemaker` starts the deployed training stack's state machine (`scones-<env>-training`, created by
`make deploy`) with boto3 and follows it: each state it enters and each status change of its training
job, one line each on stderr; at the end the model artifact's S3 URL on stdout. A model that passes the
evaluation gate is registered in the model registry `scones-<env>`; once approved (`approve`), its URL is
recorded in the SSM parameter `/scones/<env>/model-data-url` the endpoint serves. Data, algorithm and hyperparameters
are the deployed stack's: the algorithm is chosen at deploy time (`-c training_algorithm=pytorch|builtin`),
and `--algorithm` only checks that the deployed one is the one wanted.

Exit status: 0 trained; 1 training failed (the reason on one line); 2 nothing started (bad arguments,
no credentials, stack not deployed, another algorithm deployed, data not staged, OUT not writable);
130 interrupted (with --sagemaker the execution keeps running).
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError, NoRegionError

from monitoring.captures import split_s3_uri
from stacks.config import SconesConfig, stack_name
from training import photo_check, report, sourcedir
from training.hyperparameters import (
    HYPERPARAMETERS,
    HyperparameterError,
    HyperparameterParser,
    add_hyperparameters,
    parse_hyperparameters,
)

MANIFESTS = ("train.lst", "validation.lst")
ALGORITHMS = ("pytorch", "builtin")
POLL_SECONDS = 10
RUNNING = "RUNNING"


class FitError(ValueError):
    """Nothing was trained: the data, a hyperparameter or the deployment is unusable; the message says which."""


class TrainingFailed(RuntimeError):
    """The training ran and failed; the message says why."""


class Interrupted(RuntimeError):
    """Ctrl-C during a fit; the message says what became of it."""


# ------------------------------------------------------------------------------------------ --local


def fit_local(data_dir, out_dir, labels_dir=None, check_photos=None, **hyperparameters) -> Path:
    """Train on the staged data folder `data_dir` (and the reviewed photos of `labels_dir`, `<class>/<photo>`);
    answers the path of `out_dir/model.tar.gz`. With `check_photos`, a folder of `bicycle/`, `motorcycle/` and
    other folders of photos (training/photo_check.py), the trained model answers each of them through its serving
    code, and metrics.json (`real_photos`) and the report show how it did.

    Everything is written in a temporary folder inside `out_dir` and moved into place once complete, so a
    failed or interrupted fit leaves nothing half-written under a final name.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    stage = "(stage it with `python -m training.etl`)"
    if not data_dir.exists():
        raise FitError(f"data folder {data_dir} does not exist {stage}")
    if not data_dir.is_dir():
        raise FitError(
            f"data folder {data_dir} is a file, not a folder: pass the folder `python -m training.etl --out DIR` staged"
        )
    missing = [name for name in MANIFESTS if not (data_dir / name).is_file()]
    if missing:
        raise FitError(f"data folder {data_dir} has no {' or '.join(missing)} {stage}")
    if labels_dir is not None and not Path(labels_dir).is_dir():
        raise FitError(f"--labels {labels_dir} is not a folder: pass a folder with a subfolder of photos per class")
    try:
        photos = photo_check.read_photos(check_photos) if check_photos is not None else None
    except (photo_check.PhotoFolderError, OSError) as error:
        raise FitError(f"--check-photos: {error}") from None
    arguments = [f"--{name}={value}" for name, value in hyperparameters.items()]
    try:
        parse_hyperparameters(arguments)
    except HyperparameterError as error:
        raise FitError(str(error)) from None
    if out_dir.exists() and not out_dir.is_dir():
        raise FitError(f"--out {out_dir} is a file, not a folder: choose a folder for the model and its report")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=out_dir, prefix=".fit-")).resolve()
    except OSError as error:
        raise FitError(
            f"cannot write to {out_dir} ({error.strerror}): choose another --out folder or make this one writable"
        ) from None

    try:
        model_dir, output_dir = work / "model", work / "output"
        script = sourcedir.copy(work / "code")
        channels = ["train", "train_lst", "validation", "validation_lst"]
        if (data_dir / "test.lst").is_file():
            channels += ["test", "test_lst"]
        env = {
            **{name: value for name, value in os.environ.items() if not name.startswith("SM_")},
            "SM_MODEL_DIR": str(model_dir),
            "SM_OUTPUT_DATA_DIR": str(output_dir),
            **{f"SM_CHANNEL_{name.upper()}": str(data_dir.resolve()) for name in channels},
            **({"SM_CHANNEL_LABELS": str(Path(labels_dir).resolve())} if labels_dir is not None else {}),
        }
        try:
            finished = subprocess.run([sys.executable, script.name, *arguments], cwd=script.parent, env=env)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; nothing was written to {out_dir}") from None
        if finished.returncode:
            raise TrainingFailed(f"train.py failed (exit status {finished.returncode})")
        try:
            if photos is not None:
                add_photo_check(output_dir / "metrics.json", model_dir, photos, Path(check_photos))
            report.write(output_dir, data_dir)
            with tarfile.open(work / "model.tar.gz", "w:gz") as tar:
                for path in sorted(model_dir.iterdir()):
                    tar.add(path, arcname=path.name)
            for path in sorted(output_dir.iterdir()):
                os.replace(path, out_dir / path.name)
            os.replace(work / "model.tar.gz", out_dir / "model.tar.gz")
        except OSError as error:
            raise TrainingFailed(f"could not write the model and its report into {out_dir}: {error}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir / "model.tar.gz"


def add_photo_check(metrics_path: Path, model_dir: Path, photos: list, folder: Path) -> None:
    """The trained model's figures on the labelled photos, as `real_photos` in metrics.json (OUT's, not the one in
    model.tar.gz, which is the training job's). A check that fails is reported and leaves the model as it is."""
    print(f"checking the model on {len(photos)} photos of {folder}", file=sys.stderr, flush=True)
    try:
        figures = photo_check.score_model_dir(model_dir, photos, "fit")
    except Exception as error:  # a measurement only: the trained model is kept whatever goes wrong here
        print(f"fit: warning: could not check the photos of {folder}: {error}", file=sys.stderr, flush=True)
        return
    metrics = json.loads(metrics_path.read_text())
    metrics["real_photos"] = {"folder": str(folder), **figures}
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")


# -------------------------------------------------------------------------------------- --sagemaker


def deploy_command(env: str, stacks: list[str], context: str = "") -> str:
    context = " ".join(filter(None, [f"-c env={env}" if env != "dev" else "", context]))
    names = " ".join(stack_name(env, stack) for stack in stacks)
    return f'make deploy STACKS="{names}"' + (f' CONTEXT="{context}"' if context else "")


def find_state_machine(stepfunctions, name: str) -> str | None:
    """The ARN of the state machine called `name`, or None."""
    for page in stepfunctions.get_paginator("list_state_machines").paginate():
        for machine in page["stateMachines"]:
            if machine["name"] == name:
                return machine["stateMachineArn"]
    return None


def training_job_parameters(definition: dict) -> dict:
    """The CreateTrainingJob parameters of the state that trains."""
    for state in definition["States"].values():
        if state.get("Type") == "Task" and ":sagemaker:createTrainingJob" in state.get("Resource", ""):
            return state["Parameters"]
    raise FitError("the deployed state machine has no SageMaker training step: redeploy the training stack")


def algorithm_of(parameters: dict) -> str:
    """`builtin` or `pytorch`, from the training image: `.../image-classification:1` or `.../pytorch-training:...`."""
    image = parameters["AlgorithmSpecification"]["TrainingImage"]
    repository = image.rsplit("/", 1)[-1].split(":")[0]
    return {"image-classification": "builtin", "pytorch-training": "pytorch"}.get(repository, image)


def check_data_staged(s3, parameters: dict) -> None:
    """Fail before anything starts when a channel's S3 location is empty (the ETL has not been run)."""
    for channel in parameters["InputDataConfig"]:
        if channel["ChannelName"] in ("code", "labels"):  # the state machine keeps labels/ from being empty
            continue
        bucket, key = split_s3_uri(channel["DataSource"]["S3DataSource"]["S3Uri"])
        try:
            found = s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)["KeyCount"]
        except ClientError:
            continue  # not allowed to look: SageMaker will say so if the data is missing
        if not found:
            raise FitError(
                f"s3://{bucket}/{key} is empty: stage the data first with "
                f"`python -m training.etl --out data --bucket {bucket}`"
            )


def training_job_name(events: list[dict]) -> str | None:
    """The newest training job's name (a retry makes a new one), from the history's TaskScheduled events."""
    scheduled = [event["taskScheduledEventDetails"] for event in events if "taskScheduledEventDetails" in event]
    names = [
        json.loads(details["parameters"]).get("TrainingJobName")
        for details in scheduled
        if details["resourceType"] == "sagemaker" and details["resource"].startswith("createTrainingJob")
    ]
    return names[-1] if names else None


def training_job_lines(job: dict) -> list[str]:
    """One line per secondary status the training job went through, with SageMaker's message."""
    lines = [
        f"training job {job['TrainingJobName']}: {transition['Status']}: {transition.get('StatusMessage', '')}"
        for transition in job.get("SecondaryStatusTransitions", [])
    ]
    return lines or [f"training job {job['TrainingJobName']}: {job['TrainingJobStatus']}"]


def follow_execution(stepfunctions, sagemaker, execution_arn: str, say, poll_seconds: float = POLL_SECONDS):
    """Poll until the execution ends, saying each state entered and each training job change.

    Answers (the final describe_execution, the training job's description or None).
    """
    seen_events, job_name, job, job_said = 0, None, None, []
    while True:
        described = stepfunctions.describe_execution(executionArn=execution_arn)
        events = [
            event
            for page in stepfunctions.get_paginator("get_execution_history").paginate(executionArn=execution_arn)
            for event in page["events"]
        ]
        for event in events[seen_events:]:
            if "stateEnteredEventDetails" in event:
                say(f"state {event['stateEnteredEventDetails']['name']}")
        seen_events = len(events)
        if training_job_name(events) != job_name:
            job_name, job, job_said = training_job_name(events), None, []
        if job_name:
            try:
                job = sagemaker.describe_training_job(TrainingJobName=job_name)
            except ClientError:
                pass  # scheduled, not created yet
            else:
                lines = training_job_lines(job)
                for index, line in enumerate(lines):
                    if index >= len(job_said) or job_said[index] != line:
                        say(line)
                job_said = lines
        if described["status"] != RUNNING:
            return described, job
        time.sleep(poll_seconds)


def failure_reason(stepfunctions, described: dict, job: dict | None) -> str:
    """Why the execution did not succeed, on one line: the training job's FailureReason when it has one."""
    if job and job.get("FailureReason"):
        return f"training job {job['TrainingJobName']} {job['TrainingJobStatus']}: {job['FailureReason']}"
    error, cause = described.get("error"), described.get("cause")
    if not (error or cause):
        history = stepfunctions.get_execution_history(executionArn=described["executionArn"], reverseOrder=True)
        for event in history["events"]:
            details = next(
                (value for key, value in event.items() if key.startswith("execution") and key.endswith("EventDetails")),
                None,
            )
            if details and (details.get("error") or details.get("cause")):
                error, cause = details.get("error"), details.get("cause")
                break
    with contextlib.suppress(TypeError, ValueError, AttributeError):  # a failed .sync task's cause is the job's JSON
        cause = json.loads(cause).get("FailureReason", cause)
    reason = ": ".join(str(part) for part in (error, cause) if part) or "no reason given"
    return " ".join(reason.split())[:500]


def registration_lines(described: dict, env: str) -> list[str]:
    """What the execution registered in the model registry, and how to approve it."""
    try:
        output = json.loads(described["output"])
        lines = [f"registered {output['ModelPackageArn']} ({output['ModelApprovalStatus']})"]
    except (KeyError, TypeError, ValueError):
        return []
    if output["ModelApprovalStatus"] != "Approved":
        lines.append(
            f"approve it with `python -m training.fit approve --latest{'' if env == 'dev' else f' --env {env}'}`"
        )
    return lines


def model_artifact(ssm, described: dict, parameter_name: str) -> str:
    """The model.tar.gz URL: the execution's output (`$.ModelArtifacts`), else the SSM parameter it wrote."""
    try:
        return json.loads(described["output"])["S3ModelArtifacts"]
    except (KeyError, TypeError, ValueError):
        return ssm.get_parameter(Name=parameter_name)["Parameter"]["Value"]


def fit_sagemaker(
    env: str = "dev",
    region: str | None = None,
    algorithm: str | None = None,
    poll_seconds: float = POLL_SECONDS,
    say=None,
) -> str:
    """Start the deployed training state machine of `env`, follow it; answers the model artifact's S3 URL."""
    config = SconesConfig(env_name=env)
    started = time.monotonic()
    say = say or (
        lambda text: print(f"fit: [{_clock(time.monotonic() - started)}] {text}", file=sys.stderr, flush=True)
    )
    session = boto3.Session(region_name=region)
    retries = Config(retries={"mode": "standard", "max_attempts": 10})
    stepfunctions, sagemaker = (session.client(name, config=retries) for name in ("stepfunctions", "sagemaker"))

    name = f"{config.prefix}-training"
    arn = find_state_machine(stepfunctions, name)
    if arn is None:
        raise FitError(
            f"no state machine {name} in {session.region_name}: deploy the training stack with "
            f"`{deploy_command(env, ['Data', 'Training'])}` (see README), "
            f"or train on this machine with --local"
        )
    definition = stepfunctions.describe_state_machine(stateMachineArn=arn)["definition"]
    parameters = training_job_parameters(json.loads(definition))
    deployed = algorithm_of(parameters)
    if algorithm and algorithm != deployed:
        raise FitError(
            f"{name} trains {deployed}, not {algorithm}: redeploy it with "
            f"`{deploy_command(env, ['Training'], f'-c training_algorithm={algorithm}')}` "
            f"(and deploy the endpoint with the same context)"
        )
    check_data_staged(session.client("s3", config=retries), parameters)

    execution_arn = stepfunctions.start_execution(
        stateMachineArn=arn,
        name=f"fit-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}",
        input="{}",
    )["executionArn"]
    try:
        say(f"started {name} ({deployed}): {execution_arn}")
        described, job = follow_execution(stepfunctions, sagemaker, execution_arn, say, poll_seconds)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; the execution keeps running, and its training job with it. Stop it with: "
            f"aws stepfunctions stop-execution --execution-arn {execution_arn}"
        ) from None
    except (BotoCoreError, ClientError) as error:
        raise TrainingFailed(
            f"lost track of the execution ({_aws_error(error)}); it may still be running: "
            f"aws stepfunctions describe-execution --execution-arn {execution_arn}"
        ) from None
    if described["status"] != "SUCCEEDED":
        raise TrainingFailed(
            f"execution {described['status']}: {failure_reason(stepfunctions, described, job)} ({execution_arn})"
        )
    for line in registration_lines(described, env):
        say(line)
    say(
        "succeeded; once approved, deploy the endpoint with `"
        + deploy_command(env, ["Endpoint"], "" if deployed == "pytorch" else f"-c training_algorithm={deployed}")
        + "`"
    )
    return model_artifact(session.client("ssm", config=retries), described, config.model_parameter_name)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes:02d}:{seconds:02d}"


def _aws_error(error: Exception) -> str:
    """One line for an error of the AWS client."""
    if isinstance(error, NoCredentialsError):
        return (
            "no AWS credentials: configure them (`aws configure`, AWS_PROFILE) and deploy with `make deploy`, "
            "or train on this machine with --local"
        )
    if isinstance(error, NoRegionError):
        return "no AWS region: pass --region or set AWS_REGION"
    if isinstance(error, EndpointConnectionError):
        return f"cannot reach AWS: {error}"
    if isinstance(error, ClientError):
        return f"AWS refused {error.operation_name}: {error.response['Error'].get('Message', error)}"
    return str(error)


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["approve"]:
        from training import registry

        registry.main(argv[1:])
        return
    parser = HyperparameterParser(
        prog="python -m training.fit",
        description="Fit the model: run training/train.py here as SageMaker's PyTorch container does and pack "
        "OUT/model.tar.gz (--local), or start the deployed training state machine and follow it "
        "(--sagemaker).",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="train on this machine")
    where.add_argument(
        "--sagemaker", action="store_true", help="start the deployed training stack's state machine and wait for it"
    )
    parser.add_argument("--data", type=Path, metavar="DIR", help="--local: staged data folder (python -m training.etl)")
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="--local: folder for model.tar.gz, metrics.json and plots"
    )
    parser.add_argument(
        "--labels",
        type=Path,
        metavar="DIR",
        help="--local: reviewed photos to learn too, <class>/<photo> (as under s3://<bucket>/labels/)",
    )
    parser.add_argument(
        "--check-photos",
        type=Path,
        metavar="DIR",
        help="--local: after training, answer the photos of DIR/bicycle, DIR/motorcycle and DIR's other folders "
        "(neither) through the model's serving code; metrics.json and the report show how it did",
    )
    parser.add_argument("--env", choices=("dev", "prod"), default="dev", help="--sagemaker: the deployed environment")
    parser.add_argument("--region", help="--sagemaker: AWS region (default: the AWS configuration's)")
    parser.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        help="pytorch (training/train.py) or builtin (SageMaker's image-classification algorithm, "
        "SageMaker only); with --sagemaker, fail unless the deployed stack trains it",
    )
    add_hyperparameters(parser.add_argument_group("hyperparameters (--local), passed on to training/train.py"))
    try:
        args = parser.parse_args(argv)
        given = {
            name: getattr(args, name) for name in HYPERPARAMETERS if getattr(args, name) != parser.get_default(name)
        }
        if args.local:
            if args.algorithm == "builtin":
                raise FitError(
                    "the built-in image-classification algorithm runs only in SageMaker: deploy the "
                    "training stack with -c training_algorithm=builtin and use --sagemaker"
                )
            if args.data is None or args.out is None:
                raise FitError("--local needs --data DIR and --out DIR")
            print(fit_local(args.data, args.out, args.labels, args.check_photos, **given))
            return
        if args.data or args.out or args.labels or args.check_photos:
            raise FitError(
                "--data, --out, --labels and --check-photos are for --local: --sagemaker trains on the staged "
                "bucket and its labels/ and writes to S3"
            )
        if given:
            raise FitError(
                f"--{next(iter(given))} is for --local: with --sagemaker the hyperparameters are the "
                f"deployed stack's (context key `hyperparameters`, see README)"
            )
        print(fit_sagemaker(args.env, args.region, args.algorithm))
    except (HyperparameterError, FitError) as error:
        print(f"fit: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (BotoCoreError, ClientError) as error:
        print(f"fit: error: {_aws_error(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as error:
        print(f"fit: {error}", file=sys.stderr)
        raise SystemExit(130) from None
    except TrainingFailed as error:
        print(f"fit: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
