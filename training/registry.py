"""Approve a registered model package: `python -m training.fit approve [--package ARN | --latest]`.

The training state machine registers each model that passes the evaluation gate in the model package group
`scones-<env>` (stacks/registry.py), `PendingManualApproval` unless deployed with `-c auto_approve=true`.
Approving it here is what the SageMaker console's "Update status" does: the approval rule then records the
package's artifact and threshold in SSM, and the next `make deploy STACKS=SconesDevEndpoint` serves it.

Exit status: 0 approved (or already approved); 2 nothing approved (bad arguments, no credentials, no such
group or package, a package of another group).
"""

import argparse
import sys

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from stacks.config import SconesConfig
from training.fit import deploy_command

APPROVED = "Approved"


class ApproveError(ValueError):
    """Nothing was approved; the message says why and what to do."""


def latest_package(sagemaker, group: str) -> dict:
    """The newest package of `group` (its summary)."""
    try:
        sagemaker.describe_model_package_group(ModelPackageGroupName=group)
    except ClientError as error:
        if error.response["Error"]["Code"] in ("ValidationException", "ResourceNotFound"):
            raise ApproveError(_no_group(group)) from None
        raise
    packages = sagemaker.list_model_packages(
        ModelPackageGroupName=group, SortBy="CreationTime", SortOrder="Descending", MaxResults=1
    )["ModelPackageSummaryList"]
    if not packages:
        raise ApproveError(
            f"the model registry {group} holds no package yet: train one with `python -m training.fit --sagemaker` "
            f"(a model below the evaluation gate is not registered)"
        )
    return packages[0]


def approve(env: str = "dev", package: str | None = None, region: str | None = None, sagemaker=None) -> dict:
    """Approve `package` (an ARN), or the newest package of the environment's group; answers its description
    after the update."""
    group = SconesConfig(env_name=env).model_package_group_name
    sagemaker = sagemaker or boto3.Session(region_name=region).client("sagemaker")
    arn = package or latest_package(sagemaker, group)["ModelPackageArn"]
    try:
        described = sagemaker.describe_model_package(ModelPackageName=arn)
    except ClientError as error:
        if error.response["Error"]["Code"] in ("ValidationException", "ResourceNotFound"):
            raise ApproveError(
                f"no model package {arn}: list the registry's with "
                f"`aws sagemaker list-model-packages --model-package-group-name {group}`"
            ) from None
        raise
    if described.get("ModelPackageGroupName") != group:
        raise ApproveError(
            f"{arn} is a package of {described.get('ModelPackageGroupName') or 'no group'}, not of {group}: "
            f"pass --env for its environment"
        )
    if described.get("ModelApprovalStatus") != APPROVED:
        metadata = described.get("CustomerMetadataProperties")
        sagemaker.update_model_package(
            ModelPackageArn=arn,
            ModelApprovalStatus=APPROVED,
            ApprovalDescription="approved with python -m training.fit approve",
            # Unchanged; given again because moto's update (the local mode's registry) drops what is not given,
            # and the approval reads the threshold from it.
            **({"CustomerMetadataProperties": metadata} if metadata else {}),
        )
        described = sagemaker.describe_model_package(ModelPackageName=arn)
    return described


def _no_group(group: str) -> str:
    command = deploy_command(group.removeprefix("scones-"), ["Data", "Training"])
    return f"no model registry {group}: deploy the training stack with `{command}`"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.fit approve",
        description="Approve a model package of the registry; the approval rule then records it for the endpoint.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--package", metavar="ARN", help="the model package to approve")
    which.add_argument("--latest", action="store_true", help="the newest package of the environment's registry")
    parser.add_argument("--env", choices=("dev", "prod"), default="dev", help="the deployed environment")
    parser.add_argument("--region", help="AWS region (default: the AWS configuration's)")
    args = parser.parse_args(argv)
    try:
        described = approve(args.env, args.package, args.region)
    except ApproveError as error:
        print(f"approve: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (BotoCoreError, ClientError) as error:
        print(f"approve: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    metadata = described.get("CustomerMetadataProperties", {})
    figures = ", ".join(f"{name} {value}" for name, value in sorted(metadata.items()))
    print(
        f"approve: {described['ModelPackageArn']} is {described['ModelApprovalStatus']}"
        + (f" ({figures})" if figures else "")
        + f"; the endpoint serves it after `{deploy_command(args.env, ['Endpoint'])}`",
        file=sys.stderr,
    )
    print(described["ModelPackageArn"])
