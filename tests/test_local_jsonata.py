"""JSONata on the local Step Functions engine (moto's, with local.engine_jsonata plugged in).

First single expressions, each run as a state machine's one Pass state on moto in this process; then a
JSONata version of the classify workflow, written with CDK's JSONata constructs, run end to end with the
real handlers (as tests/test_local_workflow.py runs the synthesized JSONPath one).
"""

import hashlib
import json
import re
import uuid

import aws_cdk as cdk
import boto3
import pytest
from aws_cdk import aws_lambda as lambda_, aws_stepfunctions as sfn, aws_stepfunctions_tasks as tasks
from moto import mock_aws
from test_local_workflow import deployment, endpoint, put_image  # noqa: F401 - the deployed workflow's fixtures

from local import stepfunctions_engine
from local.assembly import Resolver, Stack
from local.executions import run_execution

ROLE_ARN = "arn:aws:iam::123456789012:role/scones-jsonata-test"


@pytest.fixture
def engine(monkeypatch):
    """A Step Functions client on moto in this process (no AWS reached), executing what it is given."""
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    stepfunctions_engine.install()
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        yield boto3.client("stepfunctions", region_name="us-east-1")


def execute(engine, definition: dict, execution_input: dict) -> dict:
    arn = engine.create_state_machine(
        name=f"jsonata-{uuid.uuid4().hex[:12]}", definition=json.dumps(definition), roleArn=ROLE_ARN
    )["stateMachineArn"]
    return run_execution(engine, arn, execution_input, timeout=20)


def output_of(engine, expression: str, execution_input: dict):
    """The value of `expression` in a Pass state's Output (wrapped in an object: moto's DescribeExecution
    answers a bare string output unquoted)."""
    definition = {
        "QueryLanguage": "JSONata",
        "StartAt": "Evaluate",
        "States": {"Evaluate": {"Type": "Pass", "Output": "{% {'value': " + expression + "} %}", "End": True}},
    }
    described = execute(engine, definition, execution_input)
    assert described["status"] == "SUCCEEDED", (expression, described.get("error"), described.get("cause"))
    return json.loads(described["output"])["value"]


PHOTO = {
    "s3_bucket": "scones-data",
    "s3_key": "test/motorcycle_s_000042.png",
    "inferences": [0.02, 0.97],
    "cause": 'Lambda said "no" \\ twice',
}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("$states.input.s3_key", "test/motorcycle_s_000042.png"),
        ("$states.input.inferences[1]", 0.97),
        ("$round(1 - $sum($states.input.inferences), 2)", 0.01),
        ("$max($states.input.inferences) >= 0.93", True),
        ("$count($states.input.inferences) * 3 + 1", 7),
        ("10 / 4", 2.5),
        ("$uppercase($substringBefore($substringAfter($states.input.s3_key, '/'), '_'))", "MOTORCYCLE"),
        (
            "'s3://' & $states.input.s3_bucket & '/' & $states.input.s3_key",
            "s3://scones-data/test/motorcycle_s_000042.png",
        ),
        ("$split($states.input.s3_key, '/')[-1]", "motorcycle_s_000042.png"),
        ("$states.input.cause & '!'", 'Lambda said "no" \\ twice!'),  # quotes and backslashes survive
        ("$states.input.missing_or_null ? 'yes' : null", None),
        ("$states.context.Execution.Input.s3_bucket", "scones-data"),
        (
            "{'label': ['bicycle', 'motorcycle'][1], 'p': $states.input.inferences[1]}",
            {"label": "motorcycle", "p": 0.97},
        ),
        # the functions Step Functions adds to JSONata
        ("$partition([1, 2, 3, 4, 5], 2)", [[1, 2], [3, 4], [5]]),
        ("$range(0, 10, 4)", [0, 4, 8]),
        ("$range(5, 1, -2)", [5, 3, 1]),
        ("$hash('scones', 'SHA-256')", hashlib.sha256(b"scones").hexdigest()),
        ("$hash('scones', 'MD5')", hashlib.md5(b"scones").hexdigest()),
        ("$parse('{\"a\": [1, null]}')", {"a": [1, None]}),
        ("$random(42) = $random(42) and $random(42) >= 0 and $random(42) < 1", True),
    ],
)
def test_expression_evaluates_as_in_aws(engine, expression, expected):
    assert output_of(engine, expression, PHOTO) == expected


def test_uuid_and_random_are_fresh_values(engine):
    answer = output_of(engine, "{'ids': [$uuid(), $uuid()], 'r': $random()}", PHOTO)
    assert all(
        re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", i) for i in answer["ids"]
    )
    assert answer["ids"][0] != answer["ids"][1]
    assert 0 <= answer["r"] < 1


@pytest.mark.parametrize(
    ("expression", "cause"),
    [
        ("$states.input.no_such_field", "returned nothing (undefined)"),
        ("$states.input.s3_key +", "could not be evaluated"),
        ("$hash($states.input.s3_key, 'SHA-3')", "MD5, SHA-1, SHA-256, SHA-384, SHA-512"),
        ("$partition($states.input.inferences, 0)", "chunk size of at least 1"),
    ],
)
def test_a_bad_expression_fails_with_query_evaluation_error(engine, expression, cause):
    definition = {
        "QueryLanguage": "JSONata",
        "StartAt": "Evaluate",
        "States": {"Evaluate": {"Type": "Pass", "Output": "{% " + expression + " %}", "End": True}},
    }
    described = execute(engine, definition, PHOTO)
    assert described["status"] == "FAILED"
    assert described["error"] == "States.QueryEvaluationError"
    assert cause in described["cause"] and expression in described["cause"]


def test_variables_pass_between_jsonata_and_jsonpath_states(engine):
    definition = {
        "StartAt": "Count",
        "States": {
            "Count": {
                "Type": "Pass",
                "QueryLanguage": "JSONata",
                "Assign": {"n": "{% $count($states.input.inferences) %}", "cause": "{% $states.input.cause %}"},
                "Output": "{% {'key': $states.input.s3_key} %}",
                "Next": "Read in JSONPath",
            },
            "Read in JSONPath": {
                "Type": "Pass",
                "Parameters": {"n.$": "$n", "key.$": "$.key"},
                "Next": "Read in JSONata",
            },
            "Read in JSONata": {
                "Type": "Pass",
                "QueryLanguage": "JSONata",
                "Output": "{% $merge([$states.input, {'twice': $n * 2, 'cause': $cause}]) %}",
                "End": True,
            },
        },
    }
    described = execute(engine, definition, PHOTO)
    assert described["status"] == "SUCCEEDED", described.get("cause")
    assert json.loads(described["output"]) == {
        "n": 2,
        "key": "test/motorcycle_s_000042.png",
        "twice": 4,
        "cause": 'Lambda said "no" \\ twice',
    }


# The classify workflow in JSONata, end to end with the real handlers.


def jsonata_classify_definition(function_arns: dict[str, str]) -> str:
    """The classification written with CDK's JSONata constructs, synthesized in a bare stack; the handlers are
    the deployed ones. Its output is what the definition computes from the filter's answer."""
    stack = cdk.Stack(cdk.App(), "JsonataClassify")

    def invoke(name: str, function_key: str, **kwargs) -> tasks.LambdaInvoke:
        function = lambda_.Function.from_function_arn(stack, f"{name} function", function_arns[function_key])
        return tasks.LambdaInvoke.jsonata(
            stack, name, lambda_function=function, retry_on_service_exceptions=False, **kwargs
        )

    serialize = invoke(
        "Serialize image data",
        "serialize",
        outputs="{% $states.result.Payload.body %}",
        assign={"photo": "{% $states.input.s3_bucket & '/' & $states.input.s3_key %}"},
    )
    classify = invoke("Classify image", "classify", outputs="{% $states.result.Payload.body %}")
    decide = invoke(
        "Filter low confidence",
        "filter",
        outputs="{% ( $p := $states.result.Payload.body.inferences; $best := $max($p); "
        "{'photo': $photo, 'class': $p[0] = $best ? 'bicycle' : 'motorcycle', 'confidence': $round($best, 2), "
        "'neither': $round(1 - $sum($p), 2), 'execution': $states.context.Execution.Name} ) %}",
    )
    # A Catch hands the error output ({"Error", "Cause"}) to the next state as its input; $states.errorOutput
    # exists only inside the Catch itself.
    decide.add_catch(
        sfn.Fail.jsonata(stack, "Low confidence", error="{% $states.input.Error %}", cause="{% $states.input.Cause %}"),
        errors=["ThresholdConfidenceNotMet"],
    )
    machine = sfn.StateMachine(
        stack,
        "Classification",
        definition_body=sfn.DefinitionBody.from_chainable(serialize.next(classify).next(decide)),
        query_language=sfn.QueryLanguage.JSONATA,
    )
    definition = stack.resolve(machine.node.default_child.definition_string)
    return Resolver().resolve(Stack("JsonataClassify", {}, {}), definition)


@pytest.fixture(scope="module")
def jsonata_classify(deployment):  # noqa: F811 - the fixture imported above
    functions = deployment.created("SconesDevWorkflow", "AWS::Lambda::Function")
    arns = {
        key: next(f["Arn"] for logical_id, f in functions.items() if logical_id.startswith(prefix))
        for key, prefix in (("serialize", "Serialize"), ("classify", "Classify"), ("filter", "Filter"))
    }
    definition = jsonata_classify_definition(arns)
    assert json.loads(definition)["QueryLanguage"] == "JSONata"
    stepfunctions = boto3.client("stepfunctions")
    return stepfunctions.create_state_machine(name="jsonata-classify", definition=definition, roleArn=ROLE_ARN)[
        "stateMachineArn"
    ]


@pytest.mark.slow
def test_jsonata_classify_succeeds_with_the_output_the_definition_computes(deployment, endpoint, jsonata_classify):  # noqa: F811
    put_image(deployment, "jsonata/motorcycle_s_000042.png")
    endpoint.answer_body = b"[0.02, 0.97]"
    stepfunctions = boto3.client("stepfunctions")
    described = run_execution(
        stepfunctions, jsonata_classify, {"s3_bucket": deployment.bucket, "s3_key": "jsonata/motorcycle_s_000042.png"}
    )
    assert described["status"] == "SUCCEEDED", described.get("cause")
    assert json.loads(described["output"]) == {
        "photo": f"{deployment.bucket}/jsonata/motorcycle_s_000042.png",
        "class": "motorcycle",
        "confidence": 0.97,
        "neither": 0.01,
        "execution": described["name"],
    }
    assert len(endpoint.requests) == 1


@pytest.mark.slow
def test_jsonata_classify_fails_low_confidence_as_defined(deployment, endpoint, jsonata_classify):  # noqa: F811
    put_image(deployment, "jsonata/bicycle_s_000007.png")
    endpoint.answer_body = b"[0.6, 0.4]"
    stepfunctions = boto3.client("stepfunctions")
    described = run_execution(
        stepfunctions, jsonata_classify, {"s3_bucket": deployment.bucket, "s3_key": "jsonata/bicycle_s_000007.png"}
    )
    assert described["status"] == "FAILED"
    assert described["error"] == "ThresholdConfidenceNotMet"
    assert json.loads(described["cause"])["errorMessage"].startswith("THRESHOLD_CONFIDENCE_NOT_MET")
    events = stepfunctions.get_execution_history(executionArn=described["executionArn"])["events"]
    entered = [e["stateEnteredEventDetails"]["name"] for e in events if "stateEnteredEventDetails" in e]
    assert entered == ["Serialize image data", "Classify image", "Filter low confidence", "Low confidence"]
