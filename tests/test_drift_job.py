"""The drift job construct alone, in a bare Stack beside a bucket and a key: its schedule, its processing job,
its roles, its cdk-nag findings, and the packaged `monitoring` it runs."""

import base64
import functools
import io
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from aws_cdk import App, Aspects, Stack, aws_kms as kms, aws_s3 as s3
from aws_cdk.assertions import Annotations, Match, Template
from cdk_nag import AwsSolutionsChecks
from conftest import ROOT, definition_of
from PIL import Image

from monitoring.__main__ import iso_time, last_period, parser as monitoring_parser
from stacks.config import SconesConfig
from stacks.drift_job import DriftJob


@functools.cache
def _built(capture_sampling_percentage: int = 100) -> tuple[Stack, DriftJob, Path]:
    app = App(context=json.loads((ROOT / "cdk.json").read_text())["context"])  # the app's feature flags
    stack = Stack(app, "Test")
    bucket = s3.Bucket(stack, "Bucket")
    key = kms.Key(stack, "CaptureKey")
    drift = DriftJob(
        stack,
        "Drift",
        config=SconesConfig(capture_sampling_percentage=capture_sampling_percentage),
        bucket=bucket,
        capture_key=key,
        metric_namespace="SconesTest",
    )
    Aspects.of(stack).add(AwsSolutionsChecks())
    return stack, drift, Path(app.synth().directory)


def _drift() -> DriftJob:
    return _built()[1]


def _template() -> Template:
    return Template.from_stack(_built()[0])


def _logical_id(construct) -> str:
    return Stack.of(construct).get_logical_id(construct.node.default_child)


def _markers() -> dict[str, str]:
    stack = _built()[0]
    bucket, key = (
        stack.get_logical_id(stack.node.find_child(name).node.default_child) for name in ("Bucket", "CaptureKey")
    )
    return {f"{bucket}.Arn": "<bucket arn>", bucket: "<bucket>", f"{key}.Arn": "<endpoint key arn>"}


def _render(value):
    """A template value as one readable string: `<AWS::Region>`, `<Logical.Arn>`, `<bucket arn>`..."""
    if isinstance(value, list):
        return [_render(item) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        return {key: _render(item) for key, item in value.items()}
    ((function, argument),) = value.items()
    if function == "Ref":
        return _markers().get(argument, f"<{argument}>")
    if function == "Fn::GetAtt":
        return _markers().get(".".join(argument), f"<{'.'.join(argument)}>")
    if function == "Fn::Join":
        return argument[0].join(_render(part) for part in argument[1])
    if function == "Fn::Sub":
        return argument
    if function == "Fn::FindInMap":
        return f"<map {argument[0]}>"
    if function == "Fn::Select" and set(argument[1]) == {"Fn::Split"}:
        separator, text = argument[1]["Fn::Split"]
        return f"<{_render(text)} split at {separator!r}, item {argument[0]}>"
    if function.startswith("Fn::"):
        raise AssertionError(f"unexpected {function} in {value}")
    return {function: _render(argument)}


def _policy_of(role_logical_id: str) -> list[dict]:
    policies = _template().find_resources("AWS::IAM::Policy")
    (policy,) = [p for p in policies.values() if p["Properties"]["Roles"] == [{"Ref": role_logical_id}]]
    return _render(policy["Properties"]["PolicyDocument"]["Statement"])


def _processing_job() -> dict:
    states = definition_of(_drift().state_machine)["States"]
    assert list(states) == ["Report on the last hour"]
    return states["Report on the last hour"]


def _array_arguments(expression: str) -> list[str]:
    """The items of a `States.Array(...)` expression: quoted literals unescaped, paths as written."""
    assert expression.startswith("States.Array(") and expression.endswith(")")
    items = re.findall(r"'((?:[^'\\]|\\.)*)'|(\$\$?[\w.]*)", expression[len("States.Array(") : -1])
    return [literal.replace("\\", "") if literal else path for literal, path in items]


def _package_key() -> str:
    return _processing_job()["Parameters"]["Environment"]["PYTHONPATH"].rsplit("/", 1)[1]


def test_the_hourly_rule_starts_the_drift_state_machine():
    monitoring = _template()
    (rule,) = monitoring.find_resources("AWS::Events::Rule").values()
    machine = _logical_id(_drift().state_machine)
    events_role = [
        logical_id
        for logical_id, resource in monitoring.find_resources("AWS::IAM::Role").items()
        if resource["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]["Principal"]
        == {"Service": "events.amazonaws.com"}
    ]
    assert rule["Properties"]["ScheduleExpression"] == "cron(10 * * * ? *)"  # 10 past every hour
    assert rule["Properties"]["State"] == "ENABLED"
    assert rule["Properties"]["Targets"] == [
        {"Arn": {"Ref": machine}, "Id": "Target0", "RoleArn": {"Fn::GetAtt": [events_role[0], "Arn"]}}
    ]
    assert _policy_of(events_role[0]) == [
        {"Action": "states:StartExecution", "Effect": "Allow", "Resource": f"<{machine}>"}
    ]


def test_the_state_machine_runs_one_processing_job_to_its_end():
    job = _processing_job()
    assert job["Resource"] == "arn:<Ref:AWS::Partition>:states:::sagemaker:createProcessingJob.sync"
    assert job["End"] is True
    assert job["Retry"] == [
        {
            "ErrorEquals": ["SageMaker.AmazonSageMakerException"],
            "IntervalSeconds": 30,
            "MaxAttempts": 3,
            "BackoffRate": 2,
        }
    ]
    parameters = job["Parameters"]
    assert parameters["ProcessingJobName.$"] == "States.Format('scones-dev-drift-{}', States.UUID())"
    assert parameters["RoleArn"] == f"<GetAtt:{_logical_id(_drift().role)}.Arn>"
    application = parameters["AppSpecification"]
    assert application["ImageUri"] == "<FindInMap:PytorchTrainingImage>"
    assert application["ContainerEntrypoint"] == ["python3", "-m", "monitoring"]
    bucket = f"<Ref:{_logical_id(_built()[0].node.find_child('Bucket'))}>"
    assert _array_arguments(application["ContainerArguments.$"]) == [
        "report",
        f"s3://{bucket}/data_capture/scones-dev/",
        "--baseline",
        "/opt/ml/processing/input/baseline",
        "--out",
        "/opt/ml/processing/report",
        "--last",
        "1h",
        "--until",
        "$$.Execution.StartTime",
        "--publish-metrics",
        "SconesTest",
        "--endpoint-name",
        "scones-dev",
        "--allow-empty",
        "--no-progress",
    ]
    key = _package_key()
    assert re.fullmatch(r"[0-9a-f]{64}\.zip", key)
    assert parameters["Environment"] == {
        "PYTHONPATH": f"/opt/ml/processing/input/code/{key}",
        "AWS_DEFAULT_REGION": "<Ref:AWS::Region>",
    }
    s3_input = {"S3DataType": "S3Prefix", "S3InputMode": "File", "S3DataDistributionType": "FullyReplicated"}
    assert parameters["ProcessingInputs"] == [
        {
            "InputName": "code",
            "S3Input": {
                "S3Uri": f"<Sub:s3://cdk-hnb659fds-assets-${{AWS::AccountId}}-${{AWS::Region}}/{key}>",
                "LocalPath": "/opt/ml/processing/input/code",
                **s3_input,
            },
        },
        {
            "InputName": "baseline",
            "S3Input": {
                "S3Uri": f"s3://{bucket}/monitoring/baseline/",
                "LocalPath": "/opt/ml/processing/input/baseline",
                **s3_input,
            },
        },
    ]
    assert parameters["ProcessingOutputConfig"] == {
        "Outputs": [
            {
                "OutputName": "report",
                "S3Output": {
                    "S3Uri.$": (
                        f"States.Format('s3://{bucket}/monitoring/reports/scones-dev/{{}}/', $$.Execution.StartTime)"
                    ),
                    "LocalPath": "/opt/ml/processing/report",
                    "S3UploadMode": "EndOfJob",
                },
            }
        ]
    }
    assert parameters["ProcessingResources"] == {
        "ClusterConfig": {"InstanceCount": 1, "InstanceType": "ml.t3.medium", "VolumeSizeInGB": 5}
    }
    assert parameters["StoppingCondition"] == {"MaxRuntimeInSeconds": 2400}
    (machine,) = _template().find_resources("AWS::StepFunctions::StateMachine").values()
    assert machine["Properties"]["StateMachineName"] == "scones-dev-drift"


def test_the_job_arguments_are_what_the_report_command_takes():
    arguments = _array_arguments(_processing_job()["Parameters"]["AppSpecification"]["ContainerArguments.$"])
    run_started = "2026-11-25T10:10:02.517Z"  # what $$.Execution.StartTime looks like
    arguments = [run_started if argument == "$$.Execution.StartTime" else argument for argument in arguments]
    args = monitoring_parser().parse_args(arguments)
    assert (args.command, args.publish_metrics, args.endpoint_name, args.allow_empty, args.no_progress, args.since) == (
        "report",
        "SconesTest",
        "scones-dev",
        True,
        True,
        None,
    )
    assert str(args.out) == "/opt/ml/processing/report" and args.baseline == "/opt/ml/processing/input/baseline"
    assert [moment.isoformat() for moment in last_period(args.last, args.until)] == [
        "2026-11-25T09:00:00+00:00",
        "2026-11-25T10:00:00+00:00",
    ]
    assert iso_time(run_started) == args.until


def test_the_job_role_reads_captures_and_baseline_writes_reports_and_puts_scones_metrics_only():
    key = _package_key()
    role = _logical_id(_drift().role)
    (resource,) = [r for logical_id, r in _template().find_resources("AWS::IAM::Role").items() if logical_id == role]
    assert resource["Properties"]["AssumeRolePolicyDocument"]["Statement"] == [
        {"Action": "sts:AssumeRole", "Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}}
    ]
    assert "ManagedPolicyArns" not in resource["Properties"] and "Policies" not in resource["Properties"]
    assets = "cdk-hnb659fds-assets-${AWS::AccountId}-${AWS::Region}"
    assert _policy_of(role) == [
        {"Sid": "PullImage", "Action": "ecr:GetAuthorizationToken", "Effect": "Allow", "Resource": "*"},
        {
            "Sid": "PullImageLayers",
            "Effect": "Allow",
            "Action": ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
            "Resource": "arn:<AWS::Partition>:ecr:<AWS::Region>:<<map PytorchTrainingImage> split at '.', item 0>:"
            "repository/pytorch-training",
        },
        {
            "Sid": "WriteJobLogs",
            "Effect": "Allow",
            "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:DescribeLogStreams", "logs:PutLogEvents"],
            "Resource": "arn:<AWS::Partition>:logs:<AWS::Region>:<AWS::AccountId>:log-group:"
            "/aws/sagemaker/ProcessingJobs:*",
        },
        {
            "Sid": "PutDriftMetrics",
            "Action": "cloudwatch:PutMetricData",
            "Effect": "Allow",
            "Resource": "*",
            "Condition": {"StringEquals": {"cloudwatch:namespace": "SconesTest"}},
        },
        {
            "Sid": "ListCapturesAndBaseline",
            "Action": "s3:ListBucket",
            "Effect": "Allow",
            "Resource": "<bucket arn>",
            "Condition": {"StringLike": {"s3:prefix": ["data_capture/scones-dev/*", "monitoring/baseline/*"]}},
        },
        {
            "Sid": "ReadCapturesAndBaseline",
            "Action": "s3:GetObject",
            "Effect": "Allow",
            "Resource": ["<bucket arn>/data_capture/scones-dev/*", "<bucket arn>/monitoring/baseline/*"],
        },
        {
            "Sid": "DecryptCaptures",
            "Action": "kms:Decrypt",
            "Effect": "Allow",
            "Resource": "<endpoint key arn>",
            "Condition": {"StringEquals": {"kms:ViaService": "s3.<AWS::Region>.amazonaws.com"}},
        },
        {
            "Sid": "WriteReports",
            "Action": "s3:PutObject",
            "Effect": "Allow",
            "Resource": "<bucket arn>/monitoring/reports/*",
        },
        {
            "Sid": "ListPackage",
            "Action": "s3:ListBucket",
            "Effect": "Allow",
            "Resource": f"arn:<AWS::Partition>:s3:::{assets}",
            "Condition": {"StringEquals": {"s3:prefix": key}},
        },
        {
            "Sid": "ReadPackage",
            "Action": "s3:GetObject",
            "Effect": "Allow",
            "Resource": f"arn:<AWS::Partition>:s3:::{assets}/{key}",
        },
    ]


def test_the_state_machine_may_run_drift_jobs_and_pass_only_the_job_role():
    role = _logical_id(_drift().state_machine.role)
    statements = _policy_of(role)
    assert statements[0]["Resource"] == "*" and all(
        action.startswith(("logs:", "xray:")) for action in statements[0]["Action"]
    )  # LoggedStateMachine's own
    assert statements[1:] == [
        {
            "Action": [
                "sagemaker:CreateProcessingJob",
                "sagemaker:DescribeProcessingJob",
                "sagemaker:StopProcessingJob",
            ],
            "Effect": "Allow",
            "Resource": (
                "arn:<AWS::Partition>:sagemaker:<AWS::Region>:<AWS::AccountId>:processing-job/scones-dev-drift-*"
            ),
        },
        {
            "Action": ["events:DescribeRule", "events:PutRule", "events:PutTargets"],
            "Effect": "Allow",
            "Resource": "arn:<AWS::Partition>:events:<AWS::Region>:<AWS::AccountId>:rule/"
            "StepFunctionsGetEventsForSageMakerProcessingJobsRule",
        },
        {
            "Action": "iam:PassRole",
            "Effect": "Allow",
            "Resource": f"<{_logical_id(_drift().role)}.Arn>",
            "Condition": {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
        },
    ]


def test_the_packaged_monitoring_runs_from_its_zip(tmp_path):
    """The asset as cdk-assets uploads it (the staged folder, zipped) on PYTHONPATH, as the job's container has it."""
    from monitoring import baseline

    staged = _built()[2] / f"asset.{_package_key().removesuffix('.zip')}"
    archive = tmp_path / _package_key()
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(staged.rglob("*")):
            zipped.write(path, path.relative_to(staged).as_posix())
    assert sorted(name for name in zipfile.ZipFile(archive).namelist() if name.endswith(".py")) == sorted(
        f"monitoring/{path.name}" for path in (ROOT / "monitoring").glob("*.py")
    )

    # A baseline and one hour of hand-written captures: enough for the report to run end to end.
    features = [
        baseline.categorical_feature("prediction", ["bicycle"] * 40 + ["motorcycle"] * 40, ["bicycle", "motorcycle"]),
        baseline.numerical_feature("top_probability", [0.6 + i / 200 for i in range(80)]),
        baseline.numerical_feature("low_confidence", [float(i < 40) for i in range(80)], "Integral"),
        baseline.categorical_feature("image_size", ["32x32"] * 80),
        baseline.categorical_feature("image_format", ["PNG/RGB"] * 80),
    ]
    statistics = {
        "version": 0,
        "dataset": {"item_count": 80, "image_count": 80},
        "features": features,
        "model": {"classes": ["bicycle", "motorcycle"], "threshold": 0.9, "temperature": 1.0},
    }
    baseline.write(statistics, baseline.constraints_of(statistics), tmp_path / "baseline")
    hour = tmp_path / "captures" / "scones-dev" / "AllTraffic" / "2026" / "11" / "25" / "09"
    hour.mkdir(parents=True)
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 120, 200)).save(png, "PNG")
    record = json.dumps(
        {
            "captureData": {
                "endpointInput": {
                    "observedContentType": "image/png",
                    "mode": "INPUT",
                    "encoding": "BASE64",
                    "data": base64.b64encode(png.getvalue()).decode(),
                },
                "endpointOutput": {
                    "observedContentType": "application/json",
                    "mode": "OUTPUT",
                    "encoding": "JSON",
                    "data": "[0.95, 0.05]",
                },
            },
            "eventMetadata": {"eventId": "e", "inferenceTime": "2026-11-25T09:30:00Z"},
            "eventVersion": "0",
        }
    )
    (hour / "30-00-000-a.jsonl").write_text("\n".join([record] * 40) + "\n")

    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(archive), "HOME": str(tmp_path)}
    where = subprocess.run(
        [sys.executable, "-c", "import monitoring; print(monitoring.__file__)"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.stdout.strip() == f"{archive}/monitoring/__init__.py", where.stderr
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "monitoring",
            "report",
            str(tmp_path / "captures"),
            "--baseline",
            str(tmp_path / "baseline"),
            "--out",
            str(tmp_path / "report"),
            "--last",
            "1h",
            "--until",
            "2026-11-25T10:10:02.517Z",
            "--allow-empty",
            "--no-progress",
        ],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["records"] == 40 and summary["first_record"] == "2026-11-25T09:30:00Z"
    assert {row["feature_name"]: row["status"] for row in summary["checks"]}["top_probability"] == "VIOLATION"


def test_the_drift_job_alone_has_no_unsuppressed_cdk_nag_finding():
    findings = Annotations.from_stack(_built()[0]).find_error(
        "/Test/Drift/*", Match.string_like_regexp("AwsSolutions-.*")
    )
    assert [f"{f.id}: {f.entry.data}" for f in findings] == []


def test_sampling_nothing_warns_that_the_drift_job_will_check_nothing():
    Annotations.from_stack(_built(capture_sampling_percentage=0)[0]).has_warning(
        "/Test/Drift", Match.string_like_regexp(r"^capture_sampling_percentage=0: .* will check nothing")
    )
    assert Annotations.from_stack(_built()[0]).find_warning("*", Match.string_like_regexp("capture_sampling")) == []
