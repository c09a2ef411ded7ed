"""The real-time SageMaker endpoint, capturing every request and answer to the bucket."""

from aws_cdk import (
    CfnOutput,
    Duration,
    Stack,
    aws_applicationautoscaling as appscaling,
    aws_iam as iam,
    aws_kms as kms,
    aws_s3 as s3,
    aws_sagemaker as sagemaker,
    aws_ssm as ssm,
)
from constructs import Construct

from stacks.config import SconesConfig
from stacks.constructs import SageMakerRole
from stacks.data_stack import CAPTURE_PREFIX
from stacks.images import image_uri, repository_arn
from stacks.training_stack import MODEL_PREFIX

VARIANT_NAME = "AllTraffic"


class EndpointStack(Stack):
    def __init__(
        self, scope: Construct, construct_id: str, *, config: SconesConfig, bucket: s3.IBucket, **kwargs
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        algorithm = config.training_algorithm
        role = SageMakerRole(
            self,
            "ModelRole",
            description="scones endpoint: read models, write captures",
            repository_arns=[repository_arn(self, algorithm, "inference")],
        ).role
        role.add_to_policy(
            iam.PolicyStatement(actions=["s3:GetObject"], resources=[bucket.arn_for_objects(f"{MODEL_PREFIX}*")])
        )
        role.add_to_policy(
            iam.PolicyStatement(actions=["s3:PutObject"], resources=[bucket.arn_for_objects(f"{CAPTURE_PREFIX}*")])
        )

        self.key = kms.Key(
            self,
            "EndpointKey",
            description="scones endpoint volumes and captured data",
            enable_key_rotation=True,
            removal_policy=config.removal,
        )
        self.key.grant_encrypt_decrypt(role)

        model_data_url = config.model_data_url or ssm.StringParameter.value_for_string_parameter(
            self, config.model_parameter_name
        )
        container = sagemaker.CfnModel.ContainerDefinitionProperty(
            image=image_uri(self, algorithm, "inference"),
            model_data_url=model_data_url,
            environment={"SAGEMAKER_PROGRAM": "inference.py"} if algorithm == "pytorch" else None,
        )
        model = sagemaker.CfnModel(self, "Model", execution_role_arn=role.role_arn, primary_container=container)
        model.node.add_dependency(role)

        self.capture_destination = bucket.s3_url_for_object(CAPTURE_PREFIX.rstrip("/"))
        endpoint_config = sagemaker.CfnEndpointConfig(
            self,
            "EndpointConfig",
            kms_key_id=self.key.key_arn,
            production_variants=[
                sagemaker.CfnEndpointConfig.ProductionVariantProperty(
                    variant_name=VARIANT_NAME,
                    model_name=model.attr_model_name,
                    instance_type=config.endpoint_instance_type,
                    initial_instance_count=config.endpoint_instance_count,
                    initial_variant_weight=1.0,
                )
            ],
            data_capture_config=sagemaker.CfnEndpointConfig.DataCaptureConfigProperty(
                enable_capture=True,
                initial_sampling_percentage=config.capture_sampling_percentage,
                destination_s3_uri=self.capture_destination,
                kms_key_id=self.key.key_arn,
                capture_options=[
                    sagemaker.CfnEndpointConfig.CaptureOptionProperty(capture_mode="Input"),
                    sagemaker.CfnEndpointConfig.CaptureOptionProperty(capture_mode="Output"),
                ],
                capture_content_type_header=sagemaker.CfnEndpointConfig.CaptureContentTypeHeaderProperty(
                    json_content_types=["application/json"],
                ),
            ),
        )
        self.endpoint = sagemaker.CfnEndpoint(
            self,
            "Endpoint",
            endpoint_name=config.endpoint_name,
            endpoint_config_name=endpoint_config.attr_endpoint_config_name,
        )

        scaling = appscaling.ScalableTarget(
            self,
            "Scaling",
            service_namespace=appscaling.ServiceNamespace.SAGEMAKER,
            resource_id=f"endpoint/{config.endpoint_name}/variant/{VARIANT_NAME}",
            scalable_dimension="sagemaker:variant:DesiredInstanceCount",
            min_capacity=config.endpoint_instance_count,
            max_capacity=max(config.endpoint_max_instances, config.endpoint_instance_count),
        )
        scaling.node.add_dependency(self.endpoint)
        scaling.scale_to_track_metric(
            "InvocationsPerInstance",
            target_value=config.invocations_per_instance_target,
            predefined_metric=appscaling.PredefinedMetric.SAGEMAKER_VARIANT_INVOCATIONS_PER_INSTANCE,
            scale_in_cooldown=Duration.minutes(5),
            scale_out_cooldown=Duration.minutes(1),
        )

        CfnOutput(
            self,
            "EndpointName",
            value=self.endpoint.attr_endpoint_name,
            description="The SageMaker endpoint the classify Lambda calls.",
        )
        CfnOutput(
            self,
            "ModelDataUrl",
            value=model_data_url,
            description="The model.tar.gz the endpoint serves (the SSM parameter's value at deploy time "
            "unless model_data_url was given).",
        )
