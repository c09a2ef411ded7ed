"""The bucket every part of the workflow reads and writes."""

from aws_cdk import CfnOutput, Duration, RemovalPolicy, Stack, aws_s3 as s3
from cdk_nag import NagSuppressions
from constructs import Construct

from stacks.config import SconesConfig

CAPTURE_PREFIX = "data_capture/"


class DataStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, config: SconesConfig, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        removal = {"removal_policy": config.removal, "auto_delete_objects": config.removal == RemovalPolicy.DESTROY}
        self.access_log_bucket = s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_PREFERRED,
            lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(365))],
            **removal,
        )
        NagSuppressions.add_resource_suppressions(
            self.access_log_bucket,
            [
                {
                    "id": "AwsSolutions-S1",
                    "reason": "This bucket receives the data bucket's server access logs; logging it to itself "
                    "would loop.",
                }
            ],
        )
        self.bucket = s3.Bucket(
            self,
            "Data",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            versioned=True,
            server_access_logs_bucket=self.access_log_bucket,
            server_access_logs_prefix="data/",
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="expire-captures",
                    prefix=CAPTURE_PREFIX,
                    expiration=Duration.days(config.capture_retention_days),
                    noncurrent_version_expiration=Duration.days(1),
                ),
                s3.LifecycleRule(id="expire-old-versions", noncurrent_version_expiration=Duration.days(30)),
            ],
            **removal,
        )

        CfnOutput(
            self,
            "BucketName",
            value=self.bucket.bucket_name,
            description="The data bucket: stage the training data into it (training.etl --bucket), put "
            "photos to classify in it.",
        )
