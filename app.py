#!/usr/bin/env python3
"""The scones CDK app: `npx cdk synth`, `npx cdk deploy --all` (see README)."""

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

from stacks.config import SconesConfig, stack_name
from stacks.data_stack import DataStack
from stacks.endpoint_stack import EndpointStack
from stacks.monitoring_stack import MonitoringStack
from stacks.training_stack import TrainingStack
from stacks.workflow_stack import WorkflowStack


def build(app: cdk.App) -> list[cdk.Stack]:
    config = SconesConfig.from_context(app.node.try_get_context)
    env = cdk.Environment(account=config.account, region=config.region)
    # No bootstrap-version rule: the same templates deploy to the local emulation (see local/).
    synthesizer = lambda: cdk.DefaultStackSynthesizer(generate_bootstrap_version_rule=False)  # noqa: E731
    common = dict(config=config, env=env)
    name = lambda stack: stack_name(config.env_name, stack)  # noqa: E731

    data = DataStack(app, name("Data"), synthesizer=synthesizer(), **common)
    training = TrainingStack(app, name("Training"), bucket=data.bucket, synthesizer=synthesizer(), **common)
    endpoint = EndpointStack(app, name("Endpoint"), bucket=data.bucket, synthesizer=synthesizer(), **common)
    workflow = WorkflowStack(app, name("Workflow"), bucket=data.bucket, synthesizer=synthesizer(), **common)
    monitoring = MonitoringStack(
        app, name("Monitoring"), state_machine=workflow.state_machine,
        state_machine_log_group_name=workflow.workflow.log_group.log_group_name,
        functions=[workflow.serialize, workflow.classify, workflow.filter], bucket=data.bucket,
        capture_key=endpoint.key, synthesizer=synthesizer(), **common)
    stacks = [data, training, endpoint, workflow, monitoring]

    for stack in stacks:
        cdk.Tags.of(stack).add("project", "scones")
        cdk.Tags.of(stack).add("environment", config.env_name)
    cdk.Aspects.of(app).add(AwsSolutionsChecks(verbose=True))
    return stacks


if __name__ == "__main__":
    app = cdk.App()
    build(app)
    app.synth()
