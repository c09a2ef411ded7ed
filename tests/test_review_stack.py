import fnmatch
import json

from aws_cdk.assertions import Annotations, Match
from conftest import synth_stacks, template

from stacks.review_stack import PUBLISH_QUEUE_METRICS

NOT_DATA = ("logs:", "xray:")


def _only(resources: dict) -> tuple[str, dict]:
    ((logical_id, resource),) = resources.items()
    return logical_id, resource["Properties"]


def _statements(construct_id: str, **context) -> list[tuple[list[str], object]]:
    """The data statements of a review Lambda's role (logging and tracing left out): (actions, resource)."""
    policies = template("Review", **context).find_resources(
        "AWS::IAM::Policy", {"Properties": {"Roles": [{"Ref": Match.string_like_regexp(f"^{construct_id}Role")}]}}
    )
    ((_, policy),) = policies.items()
    statements = []
    for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
        assert statement["Effect"] == "Allow" and "Condition" not in statement
        actions = [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
        if not all(action.startswith(NOT_DATA) for action in actions):
            assert not any(action.startswith(NOT_DATA) for action in actions)
            statements.append((sorted(actions), statement["Resource"]))
    return statements


def _ids(review) -> dict[str, str]:
    find = lambda kind: _only(review.find_resources(kind))[0]  # noqa: E731
    return {
        "table": find("AWS::DynamoDB::Table"),
        "key": find("AWS::KMS::Key"),
        "queue": _only(review.find_resources("AWS::SQS::Queue", {"Properties": {"QueueName": "scones-dev-review"}}))[0],
    }


def _data_bucket_objects(suffix: str) -> dict:
    return {"Fn::Join": ["", [{"Fn::ImportValue": Match.string_like_regexp("^SconesDevData:.*Data")}, suffix]]}


def _classify_arn(kind: str, name: str) -> dict:
    return {
        "Fn::Join": [
            "",
            [
                "arn:",
                {"Ref": "AWS::Partition"},
                ":states:",
                {"Ref": "AWS::Region"},
                ":",
                {"Ref": "AWS::AccountId"},
                f":{kind}:{name}",
            ],
        ]
    }


def test_queue_is_encrypted_with_a_customer_key_ssl_only_with_a_dead_letter_queue_after_five_receives():
    review = template("Review")
    ids = _ids(review)
    queues = {q["Properties"]["QueueName"]: q["Properties"] for q in review.find_resources("AWS::SQS::Queue").values()}
    assert set(queues) == {"scones-dev-review", "scones-dev-review-dlq"}
    (dlq_id,) = [
        i for i, q in review.find_resources("AWS::SQS::Queue").items() if q["Properties"]["QueueName"].endswith("-dlq")
    ]
    queue, dlq = queues["scones-dev-review"], queues["scones-dev-review-dlq"]
    assert queue["KmsMasterKeyId"] == dlq["KmsMasterKeyId"] == {"Fn::GetAtt": [ids["key"], "Arn"]}
    assert queue["RedrivePolicy"] == {"deadLetterTargetArn": {"Fn::GetAtt": [dlq_id, "Arn"]}, "maxReceiveCount": 5}
    # Lambda wants a visibility timeout of at least the function's timeout (30 s) for the queue it consumes
    assert queue["VisibilityTimeout"] >= 6 * 30
    _, key = _only(review.find_resources("AWS::KMS::Key"))
    assert key["EnableKeyRotation"] is True
    for queue_id in (ids["queue"], dlq_id):
        review.has_resource_properties(
            "AWS::SQS::QueuePolicy",
            {
                "Queues": [{"Ref": queue_id}],
                "PolicyDocument": {
                    "Statement": [
                        Match.object_like({"Effect": "Deny", "Condition": {"Bool": {"aws:SecureTransport": "false"}}})
                    ]
                },
            },
        )


def test_intake_consumes_the_queue_ten_at_a_time():
    review = template("Review")
    _, mapping = _only(review.find_resources("AWS::Lambda::EventSourceMapping"))
    assert mapping["BatchSize"] == 10
    assert mapping["EventSourceArn"] == {"Fn::GetAtt": [_ids(review)["queue"], "Arn"]}
    assert mapping["FunctionName"]["Ref"].startswith("ReviewIntakeFunction")
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


def test_table_keys_on_demand_ttl_pitr_and_removal_policy():
    _, table = _only(template("Review").find_resources("AWS::DynamoDB::Table"))
    assert table["TableName"] == "scones-dev-review"
    assert table["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert table["AttributeDefinitions"] == [
        {"AttributeName": "pk", "AttributeType": "S"},
        {"AttributeName": "sk", "AttributeType": "S"},
    ]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    policies = {
        env: [r["DeletionPolicy"] for r in template("Review", env=env).find_resources("AWS::DynamoDB::Table").values()]
        for env in ("dev", "prod")
    }
    assert policies == {"dev": ["Delete"], "prod": ["Retain"]}


def _function(review, name: str) -> dict:
    _, function = _only(
        review.find_resources("AWS::Lambda::Function", {"Properties": {"Handler": f"{name}.index.handler"}})
    )
    return function


def test_lambdas_environment():
    review = template("Review", review_timeout_hours="0.5")
    ids = _ids(review)
    _, client = _only(review.find_resources("AWS::Cognito::UserPoolClient"))
    intake = _function(review, "review_intake")
    assert intake["Environment"]["Variables"] == {"TABLE_NAME": {"Ref": ids["table"]}, "REVIEW_TIMEOUT_SECONDS": "1800"}
    assert intake["Runtime"] == "python3.14"
    api = _function(review, "review_api")
    (client_id,) = review.find_resources("AWS::Cognito::UserPoolClient")
    review.has_resource_properties(
        "AWS::Lambda::Function",
        {
            "Handler": "review_api.index.handler",
            "Environment": {
                "Variables": {
                    "TABLE_NAME": {"Ref": ids["table"]},
                    "BUCKET_NAME": {"Fn::ImportValue": Match.string_like_regexp("^SconesDevData:")},
                    "CLASS_NAMES": "bicycle,motorcycle",
                    "STATE_MACHINE_ARN": _classify_arn("stateMachine", "scones-dev-classify-image"),
                    "METRIC_NAMESPACE": "Scones",
                    "USER_POOL_CLIENT_ID": {"Ref": client_id},
                    "USER_POOL_REGION": {"Ref": "AWS::Region"},
                    "REVIEW_TIMEOUT_SECONDS": "1800",
                }
            },
        },
    )
    assert set(api["Environment"]["Variables"]) == {
        "TABLE_NAME",
        "BUCKET_NAME",
        "CLASS_NAMES",
        "STATE_MACHINE_ARN",
        "METRIC_NAMESPACE",
        "REVIEW_TIMEOUT_SECONDS",
        "USER_POOL_CLIENT_ID",
        "USER_POOL_REGION",
    }
    assert client["GenerateSecret"] is False


def test_intake_role_may_only_put_items_and_consume_the_queue():
    review = template("Review")
    ids = _ids(review)
    assert _statements("ReviewIntake") == [
        (["dynamodb:PutItem"], {"Fn::GetAtt": [ids["table"], "Arn"]}),
        (
            [
                "sqs:ChangeMessageVisibility",
                "sqs:DeleteMessage",
                "sqs:GetQueueAttributes",
                "sqs:GetQueueUrl",
                "sqs:ReceiveMessage",
            ],
            {"Fn::GetAtt": [ids["queue"], "Arn"]},
        ),
        (["kms:Decrypt"], {"Fn::GetAtt": [ids["key"], "Arn"]}),
    ]


def test_api_role_has_exactly_the_contracts_actions_and_resources():
    review = template("Review")
    ids = _ids(review)
    statements = _statements("ReviewApi")
    bucket_statements = [s for s in statements if s[0][0].startswith("s3:")]
    assert [s for s in statements if s not in bucket_statements] == [
        (
            ["dynamodb:DeleteItem", "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:Query"],
            {"Fn::GetAtt": [ids["table"], "Arn"]},
        ),
        (
            ["states:ListExecutions", "states:SendTaskFailure", "states:SendTaskHeartbeat", "states:SendTaskSuccess"],
            _classify_arn("stateMachine", "scones-dev-classify-image"),
        ),
        (["states:DescribeExecution"], _classify_arn("execution", "scones-dev-classify-image:*")),
    ]
    # the name the ARNs are built from is the classify state machine's (the Workflow stack depends on this one)
    template("Workflow").has_resource_properties(
        "AWS::StepFunctions::StateMachine", {"StateMachineName": "scones-dev-classify-image"}
    )
    # the photos: read any (presigned URLs, the copy's source), write only the labels and the answer records
    data = synth_stacks()["Data"]
    bucket_export = lambda resource: resource["Fn::Join"][1][0]["Fn::ImportValue"]  # noqa: E731
    (get,) = [s for s in bucket_statements if s[0] == ["s3:GetObject"]]
    (put,) = [s for s in bucket_statements if s[0] == ["s3:PutObject"]]
    assert len(bucket_statements) == 2
    assert get[1]["Fn::Join"][1][1] == "/*"
    assert [r["Fn::Join"][1][1] for r in put[1]] == ["/labels/*", "/reviews/*"]
    (export,) = {bucket_export(get[1])} | {bucket_export(r) for r in put[1]}
    assert export.startswith(f"{data.stack_name}:ExportsOutputFnGetAttData")


def test_no_other_role_in_the_app_may_answer_a_review_task():
    answering = {"states:SendTaskSuccess", "states:SendTaskFailure", "states:SendTaskHeartbeat"}
    holders = []
    for name in synth_stacks():
        resources = template(name).to_json()["Resources"]
        for logical_id, resource in resources.items():
            documents = []
            if resource["Type"] == "AWS::IAM::Policy":
                documents = [resource["Properties"]["PolicyDocument"]]
            elif resource["Type"] == "AWS::IAM::Role":
                documents = [p["PolicyDocument"] for p in resource["Properties"].get("Policies", [])]
            elif resource["Type"] == "AWS::IAM::ManagedPolicy":
                documents = [resource["Properties"]["PolicyDocument"]]
            for document in documents:
                for statement in document["Statement"]:
                    actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
                    if any(fnmatch.fnmatch(wanted, action) for wanted in answering for action in actions):
                        holders.append((name, logical_id))
    assert len(holders) == 1 and holders[0][0] == "Review" and holders[0][1].startswith("ReviewApiRole"), holders


def test_page_is_public_and_every_api_route_needs_a_reviewers_token():
    review = template("Review")
    routes = {
        r["Properties"]["RouteKey"]: r["Properties"] for r in review.find_resources("AWS::ApiGatewayV2::Route").values()
    }
    assert set(routes) == {"GET /", "ANY /api/{proxy+}"}
    assert routes["GET /"]["AuthorizationType"] == "NONE" and "AuthorizerId" not in routes["GET /"]
    api = routes["ANY /api/{proxy+}"]
    (authorizer_id, authorizer) = _only(review.find_resources("AWS::ApiGatewayV2::Authorizer"))
    assert (api["AuthorizationType"], api["AuthorizerId"]) == ("JWT", {"Ref": authorizer_id})
    (pool,) = review.find_resources("AWS::Cognito::UserPool")
    (client,) = review.find_resources("AWS::Cognito::UserPoolClient")
    assert authorizer["AuthorizerType"] == "JWT"
    assert authorizer["IdentitySource"] == ["$request.header.Authorization"]
    assert authorizer["JwtConfiguration"] == {
        "Audience": [{"Ref": client}],
        "Issuer": {
            "Fn::Join": ["", ["https://cognito-idp.", {"Ref": "AWS::Region"}, ".amazonaws.com/", {"Ref": pool}]]
        },
    }
    # both routes reach the review API Lambda
    _, integration = _only(review.find_resources("AWS::ApiGatewayV2::Integration"))
    assert integration["IntegrationType"] == "AWS_PROXY" and integration["PayloadFormatVersion"] == "2.0"
    assert integration["IntegrationUri"]["Fn::GetAtt"][0].startswith("ReviewApiFunction")
    assert {json.dumps(route["Target"]) for route in routes.values()} == {
        json.dumps(
            {
                "Fn::Join": [
                    "",
                    ["integrations/", {"Ref": _only(review.find_resources("AWS::ApiGatewayV2::Integration"))[0]}],
                ]
            }
        )
    }


def test_user_pool_admin_created_reviewers_strong_passwords_and_a_page_client_without_secret():
    review = template("Review")
    _, pool = _only(review.find_resources("AWS::Cognito::UserPool"))
    assert pool["AdminCreateUserConfig"]["AllowAdminCreateUserOnly"] is True
    assert pool["Policies"]["PasswordPolicy"] == {
        "MinimumLength": 12,
        "RequireLowercase": True,
        "RequireUppercase": True,
        "RequireNumbers": True,
        "RequireSymbols": True,
        "TemporaryPasswordValidityDays": 3,
    }
    assert pool["UsernameAttributes"] == ["email"]
    _, client = _only(review.find_resources("AWS::Cognito::UserPoolClient"))
    assert client["GenerateSecret"] is False
    assert sorted(client["ExplicitAuthFlows"]) == ["ALLOW_REFRESH_TOKEN_AUTH", "ALLOW_USER_PASSWORD_AUTH"]
    assert client["PreventUserExistenceErrors"] == "ENABLED"


def test_access_logging_is_on():
    review = template("Review")
    _, stage = _only(review.find_resources("AWS::ApiGatewayV2::Stage"))
    destination = stage["AccessLogSettings"]["DestinationArn"]["Fn::GetAtt"]
    assert destination[1] == "Arn" and destination[0] in review.find_resources("AWS::Logs::LogGroup")
    assert stage["StageName"] == "$default" and stage["AutoDeploy"] is True
    fields = json.loads(stage["AccessLogSettings"]["Format"])
    assert {"requestId", "routeKey", "status", "authorizerError"} <= set(fields)
    assert fields["requestId"] == "$context.requestId"


def test_queue_metrics_are_published_every_five_minutes():
    review = template("Review")
    _, rule = _only(review.find_resources("AWS::Events::Rule"))
    assert rule["ScheduleExpression"] == "rate(5 minutes)"
    (target,) = rule["Targets"]
    assert target["Arn"]["Fn::GetAtt"][0].startswith("ReviewApiFunction")
    assert json.loads(target["Input"]) == PUBLISH_QUEUE_METRICS == {"action": "publish_queue_metrics"}


def test_outputs_give_the_page_the_pool_and_how_to_add_a_reviewer():
    review = template("Review")
    outputs = review.find_outputs("*")
    (api,) = review.find_resources("AWS::ApiGatewayV2::Api")
    (pool,) = review.find_resources("AWS::Cognito::UserPool")
    url = outputs["ReviewPageUrl"]["Value"]["Fn::Join"][1]
    assert url[:2] == ["https://", {"Ref": api}] and url[-1] == "/"
    assert outputs["UserPoolId"]["Value"] == {"Ref": pool}
    command = "".join(
        p if isinstance(p, str) else json.dumps(p) for p in outputs["AddReviewerCommand"]["Value"]["Fn::Join"][1]
    )
    assert command.startswith("aws cognito-idp admin-create-user ")
    assert f"--user-pool-id {json.dumps({'Ref': pool})}" in command
    assert "admin-set-user-password" in command and "--permanent" in command


def test_no_review_stack_and_the_classic_workflow_with_review_off():
    assert "Review" not in synth_stacks(review="false")
    assert "Review" in synth_stacks()


def test_counting_labels_adds_only_updating_the_table_and_putting_events_on_the_default_bus():
    review = template("Review", retrain_after_labels="50")
    ids = _ids(review)
    statements = _statements("ReviewApi", retrain_after_labels="50")
    default_statements = _statements("ReviewApi")
    added = [s for s in statements if s not in default_statements]
    assert added == [
        (
            ["dynamodb:DeleteItem", "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:Query", "dynamodb:UpdateItem"],
            {"Fn::GetAtt": [ids["table"], "Arn"]},
        ),
        (
            ["events:PutEvents"],
            {
                "Fn::Join": [
                    "",
                    [
                        "arn:",
                        {"Ref": "AWS::Partition"},
                        ":events:",
                        {"Ref": "AWS::Region"},
                        ":",
                        {"Ref": "AWS::AccountId"},
                        ":event-bus/default",
                    ],
                ]
            },
        ),
    ]
    # the default table statement is the one replaced: nothing else changed
    assert [s for s in default_statements if s not in statements] == [
        (
            ["dynamodb:DeleteItem", "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:Query"],
            {"Fn::GetAtt": [ids["table"], "Arn"]},
        )
    ]
    assert _function(review, "review_api")["Environment"]["Variables"]["RETRAIN_AFTER_LABELS"] == "50"


def test_without_retrain_after_labels_the_api_neither_counts_nor_puts_events():
    review = template("Review")
    actions = {action for actions, _ in _statements("ReviewApi") for action in actions}
    assert not {"dynamodb:UpdateItem", "events:PutEvents"} & actions
    assert "RETRAIN_AFTER_LABELS" not in _function(review, "review_api")["Environment"]["Variables"]


def test_counting_labels_leaves_no_unsuppressed_cdk_nag_finding():
    stacks = synth_stacks(retrain_after_labels="50")
    for name in ("Review", "Monitoring"):
        findings = Annotations.from_stack(stacks[name]).find_error("*", Match.string_like_regexp("AwsSolutions-.*"))
        assert [f"{f.id}: {f.entry.data}" for f in findings] == [], name
