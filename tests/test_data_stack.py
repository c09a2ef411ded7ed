from aws_cdk.assertions import Match
from conftest import template


def test_bucket_is_encrypted_versioned_and_not_public():
    bucket = template("Data").find_resources(
        "AWS::S3::Bucket", {"Properties": {"VersioningConfiguration": Match.any_value()}}
    )
    assert len(bucket) == 1
    properties = next(iter(bucket.values()))["Properties"]
    assert properties["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "AES256"
    }
    assert properties["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert properties["VersioningConfiguration"] == {"Status": "Enabled"}
    assert properties["LoggingConfiguration"]["LogFilePrefix"] == "data/"


def test_every_bucket_denies_requests_without_ssl():
    data = template("Data")
    buckets = data.find_resources("AWS::S3::Bucket")
    policies = data.find_resources("AWS::S3::BucketPolicy").values()
    assert {policy["Properties"]["Bucket"]["Ref"] for policy in policies} == set(buckets)
    for policy in policies:
        assert any(
            statement["Effect"] == "Deny"
            and statement["Action"] == "s3:*"
            and statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]
        )


def test_captures_expire_after_the_configured_days():
    template("Data", capture_retention_days="7").has_resource_properties(
        "AWS::S3::Bucket",
        {
            "LifecycleConfiguration": {
                "Rules": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "Id": "expire-captures",
                                "Prefix": "data_capture/",
                                "ExpirationInDays": 7,
                                "Status": "Enabled",
                            }
                        )
                    ]
                )
            },
        },
    )


def test_dev_destroys_its_buckets_and_prod_retains_them():
    dev = template("Data", env="dev")
    assert {b["DeletionPolicy"] for b in dev.find_resources("AWS::S3::Bucket").values()} == {"Delete"}
    assert len(dev.find_resources("Custom::S3AutoDeleteObjects")) == 2
    prod = template("Data", env="prod")
    assert {b["DeletionPolicy"] for b in prod.find_resources("AWS::S3::Bucket").values()} == {"Retain"}
    assert prod.find_resources("Custom::S3AutoDeleteObjects") == {}


def test_output_names_the_data_bucket():
    data = template("Data")
    (bucket,) = data.find_resources("AWS::S3::Bucket", {"Properties": {"VersioningConfiguration": Match.any_value()}})
    output = data.find_outputs("BucketName")["BucketName"]
    assert output["Value"] == {"Ref": bucket}
    assert "training.etl --bucket" in output["Description"]
