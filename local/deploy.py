"""Deploy a synthesized cloud assembly into the local AWS (moto), resource by resource.

Each supported resource type is created through the ordinary AWS API with boto3, so whatever the
clients point at (the moto server of `make run`, or a test's) holds the result. Resources that the
local mode does not emulate are listed in the report, never dropped silently.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import boto3

from local.assembly import ACCOUNT, REGION, Resolver, Stack, UnresolvedReference

REVIEW_PAGE_LOCALLY = (
    "the review API is served on 127.0.0.1 by `python -m local` (local/review.py), which stands in for API Gateway "
    "and its Cognito authorizer with a token of its own"
)
# Types that shape nothing a local run could observe.
SILENT = {"AWS::CDK::Metadata"}
NOT_EMULATED_WHY = {
    "AWS::IAM::Policy": "IAM policies are not enforced by moto (roles exist, permissions are not checked)",
    "AWS::S3::BucketPolicy": "bucket policies (SSL only) are not enforced locally",
    "Custom::S3AutoDeleteObjects": "auto-delete of objects runs on stack deletion in AWS only",
    "AWS::ApplicationAutoScaling::ScalableTarget": "endpoint auto scaling: one local server process",
    "AWS::ApplicationAutoScaling::ScalingPolicy": "endpoint auto scaling: one local server process",
    "AWS::CloudWatch::Alarm": "alarms and the dashboard need CloudWatch metrics; locally the capture report "
    "checks drift",
    "AWS::CloudWatch::Dashboard": "alarms and the dashboard need CloudWatch metrics; locally the capture report "
    "checks drift",
    "AWS::SNS::Topic": "alarm notifications are sent by AWS only",
    "AWS::SNS::TopicPolicy": "alarm notifications are sent by AWS only",
    "AWS::SNS::Subscription": "alarm notifications are sent by AWS only",
    "AWS::ApiGatewayV2::Api": REVIEW_PAGE_LOCALLY,
    "AWS::ApiGatewayV2::Stage": REVIEW_PAGE_LOCALLY,
    "AWS::ApiGatewayV2::Integration": REVIEW_PAGE_LOCALLY,
    "AWS::ApiGatewayV2::Route": REVIEW_PAGE_LOCALLY,
    "AWS::ApiGatewayV2::Authorizer": REVIEW_PAGE_LOCALLY,
    "AWS::Lambda::Permission": "resource policies are not enforced by moto",
    "AWS::SQS::QueuePolicy": "queue policies (SSL only) are not enforced locally",
    "AWS::Events::Rule": "EventBridge rules do not fire locally (moto emits no SageMaker or alarm events and runs "
    "no schedules); `up` starts the approval state machine itself once it has approved the package it registered",
}


@dataclass
class Report:
    created: list[str] = field(default_factory=list)
    not_emulated: list[str] = field(default_factory=list)
    sagemaker: dict[str, dict[str, dict]] = field(default_factory=dict)  # type -> logical id -> resolved properties


def _references(value) -> set[str]:
    if isinstance(value, list):
        return set().union(*map(_references, value)) if value else set()
    if not isinstance(value, dict):
        return set()
    found = set()
    for key, item in value.items():
        if key == "Ref" and isinstance(item, str):
            found.add(item)
        elif key == "Fn::GetAtt":
            found.add(item[0] if isinstance(item, list) else item.split(".")[0])
        elif key == "Fn::Sub":
            text = item if isinstance(item, str) else item[0]
            found |= {name.split(".")[0] for name in re.findall(r"\$\{([^!}][^}]*)\}", text)}
        found |= _references(item)
    return found


def creation_order(stack: Stack) -> list[str]:
    """Logical ids ordered so that each resource comes after the resources it refers to or depends on."""
    resources = stack.resources
    order: list[str] = []
    visiting: set[str] = set()

    def visit(logical_id: str) -> None:
        if logical_id in order or logical_id not in resources:
            return
        if logical_id in visiting:
            raise ValueError(f"{stack.name}: circular reference through {logical_id}")
        visiting.add(logical_id)
        resource = resources[logical_id]
        depends = resource.get("DependsOn", [])
        for dependency in sorted(
            _references(resource.get("Properties", {})) | set([depends] if isinstance(depends, str) else depends)
        ):
            visit(dependency)
        visiting.discard(logical_id)
        order.append(logical_id)

    for logical_id in resources:
        visit(logical_id)
    return order


def _physical_name(stack: Stack, logical_id: str, given: str | None, limit: int, lower: bool = False) -> str:
    name = given or f"{stack.name}-{logical_id}"[:limit]
    return name.lower() if lower else name


def _zip_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


class LocalDeployment:
    """Creates the resources of each stack in the local AWS and records their physical ids."""

    def __init__(self, session: boto3.Session | None = None) -> None:
        self.session = session or boto3.Session(region_name=REGION)
        self.resolver = Resolver()
        self.report = Report()
        self.creators: dict[str, Callable[[Stack, str, dict], dict]] = {
            "AWS::S3::Bucket": self._bucket,
            "AWS::IAM::Role": self._role,
            "AWS::Logs::LogGroup": self._log_group,
            "AWS::Lambda::Function": self._function,
            "AWS::StepFunctions::StateMachine": self._state_machine,
            "AWS::KMS::Key": self._kms_key,
            "AWS::SageMaker::Model": self._sagemaker,
            "AWS::SageMaker::EndpointConfig": self._sagemaker,
            "AWS::SageMaker::Endpoint": self._sagemaker,
            "AWS::SageMaker::ModelPackageGroup": self._model_package_group,
            "AWS::SQS::Queue": self._queue,
            "AWS::SSM::Parameter": self._parameter,
            "AWS::DynamoDB::Table": self._table,
            "AWS::Lambda::EventSourceMapping": self._event_source_mapping,
            "AWS::Cognito::UserPool": self._user_pool,
            "AWS::Cognito::UserPoolClient": self._user_pool_client,
        }

    def created(self, stack_name: str, kind: str) -> dict[str, dict]:
        """What was created of `kind` in the stack: logical id -> attributes ("Ref", "Arn", ...)."""
        return {
            logical_id: attributes
            for logical_id, attributes in self.resolver.physical.get(stack_name, {}).items()
            if attributes["Type"] == kind
        }

    def client(self, service: str):
        return self.session.client(service)

    def deploy(self, stack: Stack) -> None:
        self._resolve_ssm_parameters(stack)
        for logical_id in creation_order(stack):
            resource = stack.resources[logical_id]
            kind = resource["Type"]
            if kind in SILENT:
                continue
            creator = self.creators.get(kind)
            if creator is None:
                why = NOT_EMULATED_WHY.get(kind, "no local emulation")
                self.report.not_emulated.append(f"{stack.name}/{logical_id} ({kind}): {why}")
                continue
            properties = self.resolver.resolve(stack, resource.get("Properties", {}))
            self.resolver.record(stack, logical_id, Type=kind, **creator(stack, logical_id, properties))
            self.report.created.append(f"{stack.name}/{logical_id} ({kind})")
        self.resolver.record_outputs(stack)

    def _resolve_ssm_parameters(self, stack: Stack) -> None:
        for name, parameter in stack.template.get("Parameters", {}).items():
            if parameter["Type"].startswith("AWS::SSM::Parameter::Value"):
                try:
                    value = self.client("ssm").get_parameter(Name=parameter["Default"])["Parameter"]["Value"]
                except self.client("ssm").exceptions.ParameterNotFound:
                    raise UnresolvedReference(
                        f"{stack.name} needs SSM parameter {parameter['Default']}: train a model first"
                    ) from None
                self.resolver.parameters.setdefault(stack.name, {})[name] = value

    def _bucket(self, stack: Stack, logical_id: str, properties: dict) -> dict:
        name = _physical_name(stack, logical_id, properties.get("BucketName"), 63, lower=True)
        s3 = self.client("s3")
        existing = {bucket["Name"] for bucket in s3.list_buckets()["Buckets"]}
        if name not in existing:
            s3.create_bucket(Bucket=name)
        if "VersioningConfiguration" in properties:
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration=properties["VersioningConfiguration"])
        if "BucketEncryption" in properties:
            rules = [
                {"ApplyServerSideEncryptionByDefault": rule["ServerSideEncryptionByDefault"]}
                for rule in properties["BucketEncryption"]["ServerSideEncryptionConfiguration"]
            ]
            s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={"Rules": rules})
        return {
            "Ref": name,
            "Arn": f"arn:aws:s3:::{name}",
            "DomainName": f"{name}.s3.amazonaws.com",
            "RegionalDomainName": f"{name}.s3.{REGION}.amazonaws.com",
        }

    def _role(self, stack: Stack, logical_id: str, properties: dict) -> dict:
        name = _physical_name(stack, logical_id, properties.get("RoleName"), 64)
        iam = self.client("iam")
        try:
            arn = iam.get_role(RoleName=name)["Role"]["Arn"]
        except iam.exceptions.NoSuchEntityException:
            arn = iam.create_role(
                RoleName=name, AssumeRolePolicyDocument=json.dumps(properties["AssumeRolePolicyDocument"])
            )["Role"]["Arn"]
        return {"Ref": name, "Arn": arn}

    def _log_group(self, stack: Stack, logical_id: str, properties: dict) -> dict:
        name = properties.get("LogGroupName") or f"/scones/{stack.name}/{logical_id}"
        logs = self.client("logs")
        if not logs.describe_log_groups(logGroupNamePrefix=name)["logGroups"]:
            logs.create_log_group(logGroupName=name)
        return {"Ref": name, "Arn": f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{name}:*"}

    def _function(self, stack: Stack, logical_id: str, properties: dict) -> dict:
        name = _physical_name(stack, logical_id, properties.get("FunctionName"), 64)
        code = properties["Code"]
        source = stack.assets.get(code.get("S3Key", ""))
        zipped = (
            _zip_folder(source)
            if source and source.is_dir()
            else (source.read_bytes() if source else code.get("ZipFile", "").encode())
        )
        lam = self.client("lambda")
        settings = {
            "Role": properties["Role"],
            "Handler": properties.get("Handler", "index.handler"),
            "Runtime": properties.get("Runtime", "python3.11"),
            "Timeout": properties.get("Timeout", 3),
            "MemorySize": properties.get("MemorySize", 128),
            "Environment": {"Variables": properties.get("Environment", {}).get("Variables", {})},
        }
        try:
            lam.get_function(FunctionName=name)
            lam.update_function_code(FunctionName=name, ZipFile=zipped)
            lam.update_function_configuration(FunctionName=name, **settings)
        except lam.exceptions.ResourceNotFoundException:
            lam.create_function(FunctionName=name, Code={"ZipFile": zipped}, **settings)
        return {"Ref": name, "Arn": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"}

    def _state_machine(self, stack: Stack, logical_id: str, properties: dict) -> dict:
        name = _physical_name(stack, logical_id, properties.get("StateMachineName"), 80)
        definition = properties.get("DefinitionString") or json.dumps(properties["Definition"])
        sfn = self.client("stepfunctions")
        arn = f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:{name}"
        try:
            sfn.describe_state_machine(stateMachineArn=arn)
            sfn.update_state_machine(stateMachineArn=arn, definition=definition, roleArn=properties["RoleArn"])
        except sfn.exceptions.StateMachineDoesNotExist:
            sfn.create_state_machine(
                name=name,
                definition=definition,
                roleArn=properties["RoleArn"],
                type=properties.get("StateMachineType", "STANDARD"),
            )
        return {"Ref": arn, "Arn": arn, "Name": name}

    def _kms_key(self, stack: Stack, logical_id: str, properties: dict) -> dict:
        key = self.client("kms").create_key(Description=properties.get("Description", logical_id))["KeyMetadata"]
        return {"Ref": key["KeyId"], "Arn": key["Arn"], "KeyId": key["KeyId"]}

    def _queue(self, stack: Stack, logical_id: str, properties: dict) -> dict:
        name = _physical_name(stack, logical_id, properties.get("QueueName"), 80)
        attributes = {
            key: json.dumps(value) if isinstance(value, dict) else str(value)
            for key, value in properties.items()
            if key in ("VisibilityTimeout", "MessageRetentionPeriod", "KmsMasterKeyId", "RedrivePolicy", "DelaySeconds")
        }
        sqs = self.client("sqs")
        url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"
        return {"Ref": url, "Arn": arn, "QueueName": name, "QueueUrl": url}

    def _parameter(self, stack: Stack, logical_id: str, properties: dict) -> dict:
        name = _physical_name(stack, logical_id, properties.get("Name"), 1011)
        self.client("ssm").put_parameter(Name=name, Value=properties["Value"], Type=properties["Type"], Overwrite=True)
        return {"Ref": name, "Value": properties["Value"]}

    def _table(self, stack: Stack, logical_id: str, properties: dict) -> dict:
        name = _physical_name(stack, logical_id, properties.get("TableName"), 255)
        dynamodb = self.client("dynamodb")
        try:
            arn = dynamodb.describe_table(TableName=name)["Table"]["TableArn"]
        except dynamodb.exceptions.ResourceNotFoundException:
            arn = dynamodb.create_table(
                TableName=name,
                KeySchema=properties["KeySchema"],
                AttributeDefinitions=properties["AttributeDefinitions"],
                BillingMode=properties.get("BillingMode", "PAY_PER_REQUEST"),
            )["TableDescription"]["TableArn"]
        if "TimeToLiveSpecification" in properties:
            dynamodb.update_time_to_live(TableName=name, TimeToLiveSpecification=properties["TimeToLiveSpecification"])
        return {"Ref": name, "Arn": arn}

    def _event_source_mapping(self, stack: Stack, logical_id: str, properties: dict) -> dict:
        """moto runs a queue's mapped function as each message arrives, in the sending request (local.aws)."""
        lam = self.client("lambda")
        source, function = properties["EventSourceArn"], properties["FunctionName"]
        for mapping in lam.list_event_source_mappings(EventSourceArn=source)["EventSourceMappings"]:
            if mapping["FunctionArn"].split(":")[-1] == function.split(":")[-1]:
                return {"Ref": mapping["UUID"]}
        mapping = lam.create_event_source_mapping(
            EventSourceArn=source, FunctionName=function, BatchSize=properties.get("BatchSize", 10), Enabled=True
        )
        return {"Ref": mapping["UUID"]}

    def _user_pool(self, stack: Stack, logical_id: str, properties: dict) -> dict:
        """Created so that references resolve; the local review page takes its own token instead (local/review.py)."""
        name = _physical_name(stack, logical_id, properties.get("UserPoolName"), 128)
        cognito = self.client("cognito-idp")
        found = [pool for pool in cognito.list_user_pools(MaxResults=60)["UserPools"] if pool["Name"] == name]
        pool = (
            cognito.describe_user_pool(UserPoolId=found[0]["Id"]) if found else cognito.create_user_pool(PoolName=name)
        )["UserPool"]
        return {
            "Ref": pool["Id"],
            "Arn": pool["Arn"],
            "ProviderName": f"cognito-idp.{REGION}.amazonaws.com/{pool['Id']}",
            "ProviderURL": f"https://cognito-idp.{REGION}.amazonaws.com/{pool['Id']}",
        }

    def _user_pool_client(self, stack: Stack, logical_id: str, properties: dict) -> dict:
        cognito, name = self.client("cognito-idp"), properties.get("ClientName") or logical_id
        pool = properties["UserPoolId"]
        clients = cognito.list_user_pool_clients(UserPoolId=pool)["UserPoolClients"]
        found = [client for client in clients if client["ClientName"] == name]
        client = found[0] if found else cognito.create_user_pool_client(UserPoolId=pool, ClientName=name)
        client = client.get("UserPoolClient", client)
        return {"Ref": client["ClientId"], "ClientId": client["ClientId"]}

    def _model_package_group(self, stack: Stack, logical_id: str, properties: dict) -> dict:
        """The registry lives in moto's SageMaker (the local endpoint server serves models, not packages)."""
        name = properties["ModelPackageGroupName"]
        sagemaker = self.client("sagemaker")
        try:
            arn = sagemaker.describe_model_package_group(ModelPackageGroupName=name)["ModelPackageGroupArn"]
        except sagemaker.exceptions.ClientError:
            arn = sagemaker.create_model_package_group(
                ModelPackageGroupName=name,
                ModelPackageGroupDescription=properties.get("ModelPackageGroupDescription", ""),
            )["ModelPackageGroupArn"]
        return {"Ref": name, "ModelPackageGroupArn": arn, "ModelPackageGroupName": name}

    def _sagemaker(self, stack: Stack, logical_id: str, properties: dict) -> dict:
        """SageMaker resources are served by the local endpoint server (local.endpoint), not moto."""
        kind = stack.resources[logical_id]["Type"].removeprefix("AWS::SageMaker::")
        name = properties.get(f"{kind}Name") or f"{stack.name}-{logical_id}"
        self.report.sagemaker.setdefault(kind, {})[name] = properties
        return {"Ref": name, f"{kind}Name": name}
