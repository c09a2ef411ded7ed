from aws_cdk.assertions import Match
from conftest import template

DATA_BUCKET = {"Fn::ImportValue": "SconesDevData:ExportsOutputRefData666C94C774A46B8E"}
DATA_BUCKET_ARN = {"Fn::ImportValue": "SconesDevData:ExportsOutputFnGetAttData666C94C7Arn0D7E21B7"}


def test_capture_config_records_every_request_and_answer_encrypted():
    endpoint = template("Endpoint")
    (properties,) = [r["Properties"] for r in endpoint.find_resources("AWS::SageMaker::EndpointConfig").values()]
    (key,) = endpoint.find_resources("AWS::KMS::Key")
    assert properties["DataCaptureConfig"] == {
        "EnableCapture": True,
        "InitialSamplingPercentage": 100,
        "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
        "DestinationS3Uri": {"Fn::Join": ["", ["s3://", DATA_BUCKET, "/data_capture"]]},
        "KmsKeyId": {"Fn::GetAtt": [key, "Arn"]},
    }
    assert properties["KmsKeyId"] == {"Fn::GetAtt": [key, "Arn"]}
    endpoint.has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True})


def test_sampling_instance_type_and_count_come_from_context():
    template(
        "Endpoint", capture_sampling_percentage="25", endpoint_instance_type="ml.c5.xlarge", endpoint_instance_count="2"
    ).has_resource_properties(
        "AWS::SageMaker::EndpointConfig",
        {
            "DataCaptureConfig": Match.object_like({"InitialSamplingPercentage": 25}),
            "ProductionVariants": [
                Match.object_like(
                    {"InstanceType": "ml.c5.xlarge", "InitialInstanceCount": 2, "VariantName": "AllTraffic"}
                )
            ],
        },
    )


def test_endpoint_is_named_from_config_and_scales_on_invocations():
    endpoint = template("Endpoint", endpoint_name="bikes")
    endpoint.has_resource_properties("AWS::SageMaker::Endpoint", {"EndpointName": "bikes"})
    endpoint.has_resource_properties(
        "AWS::ApplicationAutoScaling::ScalableTarget",
        {
            "ResourceId": "endpoint/bikes/variant/AllTraffic",
            "MinCapacity": 1,
            "MaxCapacity": 2,
            "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
            "ServiceNamespace": "sagemaker",
        },
    )
    endpoint.has_resource_properties(
        "AWS::ApplicationAutoScaling::ScalingPolicy",
        {
            "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": Match.object_like(
                {
                    "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                    "TargetValue": 600,
                }
            ),
        },
    )


def test_model_artifact_comes_from_the_recorded_parameter_or_context():
    parameters = template("Endpoint").to_json()["Parameters"]
    assert [p["Default"] for p in parameters.values() if p["Type"].startswith("AWS::SSM::Parameter::Value")] == [
        "/scones/dev/model-data-url"
    ]
    given = template("Endpoint", model_data_url="s3://my-bucket/models/job/output/model.tar.gz")
    given.has_resource_properties(
        "AWS::SageMaker::Model",
        {
            "PrimaryContainer": Match.object_like(
                {
                    "ModelDataUrl": "s3://my-bucket/models/job/output/model.tar.gz",
                    "Environment": {"SAGEMAKER_PROGRAM": "inference.py"},
                }
            )
        },
    )


def test_model_role_reads_models_and_writes_captures_only():
    (policy,) = template("Endpoint").find_resources("AWS::IAM::Policy").values()
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    s3 = [s for s in statements if any(a.startswith("s3:") for a in _actions(s))]
    assert s3 == [
        {"Action": "s3:GetObject", "Effect": "Allow", "Resource": {"Fn::Join": ["", [DATA_BUCKET_ARN, "/models/*"]]}},
        {
            "Action": "s3:PutObject",
            "Effect": "Allow",
            "Resource": {"Fn::Join": ["", [DATA_BUCKET_ARN, "/data_capture/*"]]},
        },
    ]
    ecr = next(s for s in statements if "ecr:BatchGetImage" in _actions(s))
    image_account = {
        "Fn::Select": [
            0,
            {"Fn::Split": [".", {"Fn::FindInMap": ["PytorchInferenceImage", {"Ref": "AWS::Region"}, "uri"]}]},
        ]
    }
    assert ecr["Resource"] == {
        "Fn::Join": [
            "",
            [
                "arn:",
                {"Ref": "AWS::Partition"},
                ":ecr:",
                {"Ref": "AWS::Region"},
                ":",
                image_account,
                ":repository/pytorch-inference",
            ],
        ]
    }


def test_model_role_pulls_only_from_the_account_that_owns_the_image_in_a_pinned_region():
    statements = [
        statement
        for policy in template("Endpoint", region="eu-west-1", account="111111111111")
        .find_resources("AWS::IAM::Policy")
        .values()
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    ]
    ecr = next(s for s in statements if "ecr:BatchGetImage" in _actions(s))
    assert ecr["Resource"] == {
        "Fn::Join": [
            "",
            [
                "arn:",
                {"Ref": "AWS::Partition"},
                ":ecr:",
                {"Ref": "AWS::Region"},
                ":763104351884:repository/pytorch-inference",
            ],
        ]
    }


def _actions(statement) -> list[str]:
    return statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]


def test_outputs_name_the_endpoint_and_the_model_it_serves():
    endpoint = template("Endpoint")
    (endpoint_id,) = endpoint.find_resources("AWS::SageMaker::Endpoint")
    (model,) = endpoint.find_resources("AWS::SageMaker::Model").values()
    outputs = endpoint.find_outputs("*")
    assert outputs["EndpointName"]["Value"] == {"Fn::GetAtt": [endpoint_id, "EndpointName"]}
    assert outputs["ModelDataUrl"]["Value"] == model["Properties"]["PrimaryContainer"]["ModelDataUrl"]
    assert outputs["ModelDataUrl"]["Value"]["Ref"].startswith("SsmParameterValuesconesdevmodeldataurl")
    given = "s3://models-bucket/run-1/model.tar.gz"
    assert template("Endpoint", model_data_url=given).find_outputs("ModelDataUrl")["ModelDataUrl"]["Value"] == given
