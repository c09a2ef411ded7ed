"""cdk-nag findings and template snapshots for every stack.

Refresh the snapshots after an intended change with `UPDATE_SNAPSHOTS=1 make test`, and review the diff.
"""

import json
import os
import re
from pathlib import Path

import pytest
from aws_cdk.assertions import Annotations, Match, Template
from conftest import synth_stacks

SNAPSHOTS = Path(__file__).parent / "snapshots"
STACKS = ["Data", "Training", "Endpoint", "Review", "Workflow", "Monitoring"]


@pytest.mark.parametrize("env", ["dev", "prod"])
@pytest.mark.parametrize("name", STACKS)
def test_no_unsuppressed_cdk_nag_finding(name, env):
    stack = synth_stacks(env=env)[name]
    findings = Annotations.from_stack(stack).find_error("*", Match.string_like_regexp("AwsSolutions-.*"))
    assert [f"{f.id}: {f.entry.data}" for f in findings] == []


def test_every_suppression_gives_a_reason():
    for name in STACKS:
        for resource in Template.from_stack(synth_stacks()[name]).to_json()["Resources"].values():
            for suppression in resource.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", []):
                assert suppression["id"].startswith("AwsSolutions-")
                assert len(suppression["reason"]) >= 40, suppression


def _normalised(template: dict) -> str:
    text = json.dumps(template, indent=1, sort_keys=True)
    return re.sub(r"[0-9a-f]{64}", "<asset-hash>", text) + "\n"


@pytest.mark.parametrize("name", STACKS)
def test_template_matches_snapshot(name):
    actual = _normalised(Template.from_stack(synth_stacks()[name]).to_json())
    snapshot = SNAPSHOTS / f"{name}.json"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        snapshot.write_text(actual)
    assert snapshot.exists(), f"no snapshot for {name}: run UPDATE_SNAPSHOTS=1 make test and review the diff"
    assert actual == snapshot.read_text(), f"{name} changed: review, then UPDATE_SNAPSHOTS=1 make test"
