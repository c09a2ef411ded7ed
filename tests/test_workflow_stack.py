import json

from aws_cdk.assertions import Match
from conftest import definition_of, synth_stacks, template

from stacks.workflow_stack import TRANSIENT_ENDPOINT_ERRORS

FUNCTIONS = {
    "serialize_image_data": ("SerializeImageData", {}),
    "classify_image": ("ClassifyImage", {"ENDPOINT_NAME": "scones-dev"}),
    "filter_inferences": (
        "FilterInferences",
        {
            "CLASS_NAMES": "bicycle,motorcycle",
            "THRESHOLD_PARAMETER": "/scones/dev/serving/threshold",
            "DEFAULT_THRESHOLD": "0.93",
            "MODEL_PARAMETER": "/scones/dev/serving/model-data-url",
            "ENDPOINT_NAME": "scones-dev",
            "METRIC_NAMESPACE": "Scones",
        },
    ),
}


def _policy_statements(workflow, construct_id: str) -> list[dict]:
    policies = workflow.find_resources(
        "AWS::IAM::Policy", {"Properties": {"Roles": [{"Ref": Match.string_like_regexp(f"^{construct_id}Role")}]}}
    )
    return [s for p in policies.values() for s in p["Properties"]["PolicyDocument"]["Statement"]]


def test_lambdas_runtime_handler_environment_timeout_tracing():
    workflow = template("Workflow")
    for name, (construct_id, environment) in FUNCTIONS.items():
        (function,) = workflow.find_resources(
            "AWS::Lambda::Function", {"Properties": {"Handler": f"{name}.index.handler"}}
        ).values()
        properties = function["Properties"]
        assert properties["Runtime"] == "python3.14"
        assert properties.get("Environment", {}).get("Variables", {}) == environment
        assert properties["Timeout"] == (30 if name == "classify_image" else 10)
        assert properties["TracingConfig"] == {"Mode": "Active"}
        assert properties["LoggingConfig"]["LogGroup"]["Ref"].startswith(construct_id)


def test_threshold_override_model_url_classes_and_endpoint_name_come_from_context():
    template(
        "Workflow",
        threshold="0.8",
        endpoint_name="bikes",
        classes="tank,tractor",
        model_data_url="s3://models/m/model.tar.gz",
    ).has_resource_properties(
        "AWS::Lambda::Function",
        {
            "Handler": "filter_inferences.index.handler",
            "Environment": {
                "Variables": {
                    "CLASS_NAMES": "tank,tractor",
                    "THRESHOLD": "0.8",
                    "MODEL_DATA_URL": "s3://models/m/model.tar.gz",
                    "ENDPOINT_NAME": "bikes",
                    "METRIC_NAMESPACE": "Scones",
                }
            },
        },
    )


def _parameter_reads(**context) -> list[tuple[str, list[str]]]:
    """The filter's SSM statements: (action, the parameter paths of its resources)."""
    return [
        (
            s["Action"],
            sorted(r["Fn::Join"][1][-1] for r in ([s["Resource"]] if "Fn::Join" in s["Resource"] else s["Resource"])),
        )
        for s in _policy_statements(template("Workflow", **context), "FilterInferences")
        if "ssm:" in json.dumps(s["Action"])
    ]


def test_filter_may_read_exactly_the_parameters_it_reads():
    assert _parameter_reads() == [
        (
            "ssm:GetParameters",
            [":parameter/scones/dev/serving/model-data-url", ":parameter/scones/dev/serving/threshold"],
        )
    ]
    assert _parameter_reads(threshold="0.8") == [
        ("ssm:GetParameters", [":parameter/scones/dev/serving/model-data-url"])
    ]
    assert _parameter_reads(model_data_url="s3://models/m/model.tar.gz", env="prod") == [
        ("ssm:GetParameters", [":parameter/scones/prod/serving/threshold"])
    ]
    assert _parameter_reads(threshold="0.8", model_data_url="s3://models/m/model.tar.gz") == []


def test_each_lambda_role_has_exactly_its_own_data_access():
    workflow = template("Workflow")
    data_actions = lambda statements: sorted(  # noqa: E731
        a
        for s in statements
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
        if not a.startswith(("logs:", "xray:"))
    )
    serialize = _policy_statements(workflow, "SerializeImageData")
    assert data_actions(serialize) == ["s3:GetObject"]
    (read,) = [s for s in serialize if s["Action"] == "s3:GetObject"]
    assert read["Resource"]["Fn::Join"][1][1] == "/*"

    classify = _policy_statements(workflow, "ClassifyImage")
    assert data_actions(classify) == ["s3:GetObject", "sagemaker:InvokeEndpoint"]
    (invoke,) = [s for s in classify if s["Action"] == "sagemaker:InvokeEndpoint"]
    assert invoke["Resource"]["Fn::Join"][1][-1] == ":endpoint/scones-dev"
    # a photo passed by reference: the bucket's objects, not the bucket or anything else
    (read,) = [s for s in classify if s["Action"] == "s3:GetObject"]
    bucket_arn, objects = read["Resource"]["Fn::Join"][1]
    assert objects == "/*" and "Data" in bucket_arn["Fn::ImportValue"]
    assert read == next(s for s in serialize if s["Action"] == "s3:GetObject")

    assert data_actions(_policy_statements(workflow, "FilterInferences")) == ["ssm:GetParameters"]


def test_classification_states_in_order_with_retries_and_low_confidence_fail():
    definition = definition_of(synth_stacks(review="false")["Workflow"].state_machine)
    states = definition["States"]
    assert definition["StartAt"] == "Serialize image data"
    assert states["Serialize image data"]["Next"] == "Classify image"
    assert states["Classify image"]["Next"] == "Filter low confidence"
    assert states["Filter low confidence"]["Next"] == "Confident"
    assert states["Confident"] == {"Type": "Succeed"}
    for name in ("Serialize image data", "Classify image", "Filter low confidence"):
        assert states[name]["OutputPath"] == "$.Payload.body"
        assert states[name]["Retry"][0]["ErrorEquals"] == [
            "Lambda.TooManyRequestsException",
            "Lambda.ServiceException",
            "Lambda.AWSLambdaException",
            "Lambda.SdkClientException",
        ]
    assert states["Classify image"]["Retry"][1] == {
        "ErrorEquals": TRANSIENT_ENDPOINT_ERRORS,
        "IntervalSeconds": 1,
        "MaxAttempts": 3,
        "BackoffRate": 2,
    }
    # a missing or bad image fails at once: only Lambda's own transient errors are retried before the classifier
    assert len(states["Serialize image data"]["Retry"]) == 1
    assert len(states["Filter low confidence"]["Retry"]) == 1
    assert states["Filter low confidence"]["Catch"] == [
        {"ErrorEquals": ["ThresholdConfidenceNotMet"], "Next": "Low confidence"}
    ]
    assert states["Low confidence"] == {"Type": "Fail", "ErrorPath": "$.Error", "CausePath": "$.Cause"}
    assert set(states) == {
        "Serialize image data",
        "Classify image",
        "Filter low confidence",
        "Confident",
        "Low confidence",
    }
    assert definition["TimeoutSeconds"] == 300


def _review_states(**context) -> tuple[dict, dict]:
    definition = definition_of(synth_stacks(**context)["Workflow"].state_machine)
    return definition, definition["States"]


def test_an_uncertain_answer_asks_a_reviewer_and_waits_for_the_answer():
    definition, states = _review_states()
    assert "Low confidence" not in states
    # the confident path does not wait
    assert states["Filter low confidence"]["Next"] == "Confident"
    assert states["Confident"] == {"Type": "Succeed"}
    assert states["Filter low confidence"]["Catch"] == [
        {"ErrorEquals": ["ThresholdConfidenceNotMet"], "ResultPath": "$.error", "Next": "Ask a reviewer"}
    ]
    ask = states["Ask a reviewer"]
    assert ask["Type"] == "Task"
    assert ask["Resource"] == "arn:<Ref:AWS::Partition>:states:::sqs:sendMessage.waitForTaskToken"
    assert ask["Parameters"]["QueueUrl"] == "<ImportValue:SconesDevReview:ExportsOutputRefQueue4A7E3555425E8BD3>"
    assert ask["Parameters"]["MessageBody"] == {
        "task_token.$": "$$.Task.Token",
        "execution_arn.$": "$$.Execution.Id",
        "requested_at.$": "$$.State.EnteredTime",
        "s3_bucket.$": "$.s3_bucket",
        "s3_key.$": "$.s3_key",
        "inferences.$": "$.inferences",
        "reason.$": "$.error.Cause",
    }
    # the reviewer's SendTaskSuccess output becomes the execution's output
    assert "ResultPath" not in ask and "OutputPath" not in ask and "ResultSelector" not in ask
    assert ask["Next"] == "Reviewed" and states["Reviewed"] == {"Type": "Succeed"}
    assert (ask["TimeoutSeconds"], "HeartbeatSeconds" in ask) == (24 * 3600, False)
    assert "Retry" not in ask


def test_a_reviewers_neither_fails_not_a_vehicle_and_no_answer_in_time_fails_review_timed_out():
    _, states = _review_states()
    ask = states["Ask a reviewer"]
    assert ask["Catch"] == [
        {"ErrorEquals": ["NotAVehicle"], "Next": "Not a vehicle"},
        {"ErrorEquals": ["States.Timeout", "States.HeartbeatTimeout"], "Next": "Review timed out"},
    ]
    assert states["Not a vehicle"] == {"Type": "Fail", "ErrorPath": "$.Error", "CausePath": "$.Cause"}
    timed_out = states["Review timed out"]
    assert (timed_out["Type"], timed_out["Error"]) == ("Fail", "ReviewTimedOut")
    assert "No reviewer answered" in timed_out["Cause"] and "-c review_timeout_hours" in timed_out["Cause"]


def test_review_timeout_and_heartbeat_come_from_the_config_and_extend_the_state_machines_timeout():
    definition, states = _review_states()
    assert definition["TimeoutSeconds"] == 24 * 3600 + 300
    # a batch waits for its children, each of which may wait for a reviewer
    assert definition_of(synth_stacks()["Workflow"].batch.state_machine)["TimeoutSeconds"] == 2 * 24 * 3600
    assert definition_of(synth_stacks(review="false")["Workflow"].batch.state_machine)["TimeoutSeconds"] == 24 * 3600
    definition, states = _review_states(review_timeout_hours="0.0006", review_heartbeat_hours="0.0003")
    assert (states["Ask a reviewer"]["TimeoutSeconds"], states["Ask a reviewer"]["HeartbeatSeconds"]) == (2, 1)
    assert definition["TimeoutSeconds"] == 2 + 300
    assert "-c review_heartbeat_hours" in states["Review timed out"]["Cause"]
    _, states = _review_states(review_timeout_hours="2", review_heartbeat_hours="0.5")
    assert (states["Ask a reviewer"]["TimeoutSeconds"], states["Ask a reviewer"]["HeartbeatSeconds"]) == (7200, 1800)


def test_the_classification_may_send_to_the_review_queue_with_its_key_and_nothing_else_of_it():
    statements = _policy_statements(template("Workflow"), "ClassificationStateMachine")
    review = [s for s in statements if "sqs:" in json.dumps(s["Action"]) or "kms:" in json.dumps(s["Action"])]
    assert [s["Action"] for s in review] == ["sqs:SendMessage", ["kms:Decrypt", "kms:GenerateDataKey*"]]
    queue, key = (s["Resource"]["Fn::ImportValue"] for s in review)
    assert queue.startswith("SconesDevReview:ExportsOutputFnGetAttQueue4A7E3555Arn")
    assert key.startswith("SconesDevReview:ExportsOutputFnGetAttQueueKey")
    assert not any("states:SendTask" in json.dumps(s["Action"]) for s in statements)
    assert not [
        s
        for s in _policy_statements(template("Workflow", review="false"), "ClassificationStateMachine")
        if "sqs:" in json.dumps(s["Action"])
    ]


def test_state_machines_are_standard_logged_and_traced():
    machines = template("Workflow").find_resources("AWS::StepFunctions::StateMachine")
    assert len(machines) == 2
    for machine in machines.values():
        properties = machine["Properties"]
        assert properties["StateMachineType"] == "STANDARD"
        assert properties["TracingConfiguration"] == {"Enabled": True}
        assert properties["LoggingConfiguration"]["Level"] == "ALL"
        assert properties["LoggingConfiguration"]["IncludeExecutionData"] is True


def test_batch_runs_every_image_under_a_prefix_as_child_executions():
    definition = definition_of(synth_stacks()["Workflow"].batch.state_machine)
    every = definition["States"][definition["StartAt"]]
    assert every["Type"] == "Map"
    assert every["ItemProcessor"]["ProcessorConfig"]["Mode"] == "DISTRIBUTED"
    assert every["ItemReader"]["Resource"].endswith(":states:::s3:listObjectsV2")
    assert every["ItemReader"]["Parameters"]["Prefix.$"] == "$.prefix"
    assert every["MaxConcurrency"] == 40
    assert every["ToleratedFailurePercentage"] == 5
    assert every["ItemSelector"] == {"Key.$": "$$.Map.Item.Value.Key"}
    inner = every["ItemProcessor"]["States"]
    choice = inner[every["ItemProcessor"]["StartAt"]]
    assert [c["StringMatches"] for c in choice["Choices"][0]["Or"]] == ["*.png", "*.jpg", "*.jpeg"]
    assert choice["Default"] == "Skip non-image"
    child = inner[choice["Choices"][0]["Next"]]
    assert child["Resource"].endswith(":states:::states:startExecution.sync:2")
    assert child["Parameters"]["Input"]["s3_key.$"] == "$.Key"
    assert child["ResultPath"] == "$.outcome"
    # a child that ran and failed is an outcome; a classification that could not run counts against the tolerance
    assert child["Catch"] == [
        {"ErrorEquals": ["States.TaskFailed"], "ResultPath": "$.outcome", "Next": "Record failure"}
    ]
    assert child["Retry"][0]["ErrorEquals"] == [
        "StepFunctions.ExecutionLimitExceededException",
        "StepFunctions.SdkClientException",
        "StepFunctions.AWSStepFunctionsException",
    ]
    assert child["ResultSelector"] == {
        "status.$": "$.Status",
        "class.$": "$.Output.class",
        "inferences.$": "$.Output.inferences",
    }


def test_batch_writes_its_results_to_the_bucket_not_its_output():
    definition = definition_of(synth_stacks()["Workflow"].batch.state_machine)
    writer = definition["States"][definition["StartAt"]]["ResultWriter"]
    assert writer["Resource"].endswith(":states:::s3:putObject")
    assert writer["Parameters"]["Prefix"] == "batch_results/"


def test_batch_role_lists_the_bucket_and_writes_only_under_batch_results():
    statements = _policy_statements(template("Workflow"), "BatchStateMachine")
    s3_access = sorted(
        (sorted([s["Action"]] if isinstance(s["Action"], str) else s["Action"]), s["Resource"])
        for s in statements
        if "s3:" in json.dumps(s["Action"])
    )
    assert [actions for actions, _ in s3_access] == [
        ["s3:AbortMultipartUpload", "s3:GetObject", "s3:ListMultipartUploadParts", "s3:PutObject"],
        ["s3:ListBucket"],
    ]
    writes, listing = (resource for _, resource in s3_access)
    assert writes["Fn::Join"][1][-1] == "/batch_results/*"
    assert "*" not in json.dumps(listing)  # the bucket itself


def test_outputs_name_both_state_machines_and_link_the_classify_one_in_the_console():
    stack = synth_stacks()["Workflow"]
    outputs = template("Workflow").find_outputs("*")
    classify, batch = (
        stack.get_logical_id(machine.node.default_child) for machine in (stack.state_machine, stack.batch.state_machine)
    )
    assert outputs["ClassifyStateMachineArn"]["Value"] == {"Ref": classify}
    assert outputs["ClassifyPrefixStateMachineArn"]["Value"] == {"Ref": batch}
    assert outputs["ClassifyConsoleUrl"]["Value"] == {
        "Fn::Join": [
            "",
            [
                "https://console.aws.amazon.com/states/home?region=",
                {"Ref": "AWS::Region"},
                "#/statemachines/view/",
                {"Ref": classify},
            ],
        ]
    }
    assert '{"s3_bucket": "<bucket>", "s3_key": "<key>"}' in outputs["ClassifyStateMachineArn"]["Description"]
    assert '{"prefix": "<prefix>"}' in outputs["ClassifyPrefixStateMachineArn"]["Description"]
    assert "console" in outputs["ClassifyConsoleUrl"]["Description"]
