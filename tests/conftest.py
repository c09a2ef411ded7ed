import contextlib
import functools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")  # before jsii starts

import aws_cdk as cdk
import boto3
import pytest
from aws_cdk.assertions import Template
from moto import mock_aws

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: E402


@functools.cache
def _synth(context_json: str) -> tuple[dict[str, cdk.Stack], Path]:
    cdk_app = cdk.App(context=json.loads(context_json))
    stacks = app.build(cdk_app)
    assembly = cdk_app.synth()
    short_names = {stack.node.id.removeprefix("SconesDev").removeprefix("SconesProd"): stack for stack in stacks}
    return short_names, Path(assembly.directory)


def _context_json(context: dict) -> str:
    defaults = json.loads((ROOT / "cdk.json").read_text())["context"]
    return json.dumps({**defaults, **context}, sort_keys=True)


def synth_stacks(**context) -> dict[str, cdk.Stack]:
    """The app's stacks, by short name (Data, Training, Endpoint, Workflow), built with `context`."""
    return _synth(_context_json(context))[0]


def assembly_directory(**context) -> Path:
    """The cloud assembly (what `cdk synth` writes to cdk.out) of the app built with `context`."""
    return _synth(_context_json(context))[1]


def template(stack_name: str, **context) -> Template:
    return Template.from_stack(synth_stacks(**context)[stack_name])


@pytest.fixture(scope="session")
def dev_stacks():
    return synth_stacks()


def _placeholder(token: dict) -> str:
    ((function, argument),) = token.items()
    if function == "Fn::GetAtt":
        argument = ".".join(argument)
    elif function == "Fn::FindInMap":
        argument = argument[0]
    elif not isinstance(argument, str):
        argument = json.dumps(argument, sort_keys=True).replace('"', "'")
    return f"<{function.removeprefix('Fn::')}:{argument}>"


def definition_of(state_machine) -> dict:
    """A synthesized state machine's definition as a dict; CloudFormation tokens become `<Ref:Id>` strings."""
    definition = cdk.Stack.of(state_machine).resolve(state_machine.node.default_child.definition_string)
    if isinstance(definition, str):
        return json.loads(definition)
    parts = definition["Fn::Join"][1]
    return json.loads("".join(part if isinstance(part, str) else _placeholder(part) for part in parts))


@pytest.fixture
def s3(monkeypatch):
    """An S3 client on moto's in-process S3 (no AWS reached) with the bucket `scones-data`."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)
    with mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="scones-data")
        yield client


@contextlib.contextmanager
def environment_restored():
    """os.environ as it was on entry, on exit: `LocalRun.start_aws` points this process's clients at the local
    AWS it started, which would otherwise reach the later test modules (and `mock_aws` would not see them)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
