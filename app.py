#!/usr/bin/env python3
"""The scones CDK app: `npx cdk synth`, `npx cdk deploy --all` (see README)."""

import os
import sys

# Set before jsii starts. Its Node runtime warns at every start that Node 20, which these machines run, has reached
# end of life: a warning about support, not behaviour, that reaches the user as eleven byte-string lines.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
# Each synth warning would otherwise point at a line of jsii's bundled JavaScript, not at this app's code
# (`cdk synth --debug` keeps the traces).
if not os.environ.get("CDK_DEBUG"):
    os.environ.setdefault("CDK_DISABLE_STACK_TRACE", "1")

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

from stacks.config import ConfigError, SconesConfig, stack_name
from stacks.data_stack import DataStack
from stacks.endpoint_stack import EndpointStack
from stacks.monitoring_stack import MonitoringStack
from stacks.review_stack import ReviewStack
from stacks.training_stack import TrainingStack
from stacks.workflow_stack import WorkflowStack


def build(app: cdk.App) -> list[cdk.Stack]:
    config = SconesConfig.from_context(app.node.get_all_context())
    env = cdk.Environment(account=config.account, region=config.region)
    # No bootstrap-version rule: the same templates deploy to the local emulation (see local/).
    synthesizer = lambda: cdk.DefaultStackSynthesizer(generate_bootstrap_version_rule=False)  # noqa: E731
    common = {"config": config, "env": env}
    name = lambda stack: stack_name(config.env_name, stack)  # noqa: E731

    data = DataStack(app, name("Data"), synthesizer=synthesizer(), **common)
    training = TrainingStack(app, name("Training"), bucket=data.bucket, synthesizer=synthesizer(), **common)
    endpoint = EndpointStack(app, name("Endpoint"), bucket=data.bucket, synthesizer=synthesizer(), **common)
    review = (
        ReviewStack(app, name("Review"), bucket=data.bucket, synthesizer=synthesizer(), **common)
        if config.review
        else None
    )
    workflow = WorkflowStack(
        app,
        name("Workflow"),
        bucket=data.bucket,
        review_queue=review.queue if review else None,
        synthesizer=synthesizer(),
        **common,
    )
    monitoring = MonitoringStack(
        app,
        name("Monitoring"),
        state_machine=workflow.state_machine,
        state_machine_log_group_name=workflow.workflow.log_group.log_group_name,
        training_state_machine=training.state_machine,
        functions=[workflow.serialize, workflow.classify, workflow.filter],
        review=review,
        bucket=data.bucket,
        capture_key=endpoint.key,
        synthesizer=synthesizer(),
        **common,
    )
    stacks = [data, training, endpoint, *([review] if review else []), workflow, monitoring]

    for stack in stacks:
        cdk.Tags.of(stack).add("project", "scones")
        cdk.Tags.of(stack).add("environment", config.env_name)
    cdk.Aspects.of(app).add(AwsSolutionsChecks(verbose=True))
    return stacks


def main() -> None:
    app = cdk.App()
    try:
        build(app)
    except ConfigError as error:  # one line naming the key; a traceback would only bury it
        sys.exit(f"scones: {error}")
    app.synth()


if __name__ == "__main__":
    main()
