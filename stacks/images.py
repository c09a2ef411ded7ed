"""SageMaker container images for the configured algorithm, resolved offline by the SageMaker SDK.

An environment-agnostic stack does not know its region at synth, so the image is looked up at
deploy time in a CfnMapping built from the SDK's bundled registry tables; a stack with a region
gets the literal URI.
"""

import functools

from aws_cdk import Aws, CfnMapping, Fn, Stack, Token
from sagemaker.core import image_uris

# 2.6 is the newest PyTorch inference image; training uses the same release so the weights load unchanged.
PYTORCH_VERSION = "2.6"
PYTHON_VERSION = "py312"


# Each lookup reloads botocore's endpoint data (about 0.5 s); every synth asks the same questions.
@functools.cache
def _retrieve(algorithm: str, purpose: str, region: str) -> str:
    if algorithm == "builtin":
        return image_uris.retrieve("image-classification", region=region)
    return image_uris.retrieve(
        framework="pytorch",
        region=region,
        version=PYTORCH_VERSION,
        py_version=PYTHON_VERSION,
        instance_type="ml.m5.large",
        image_scope=purpose,
    )


def _regions(algorithm: str, purpose: str) -> list[str]:
    if algorithm == "builtin":
        table = image_uris.config_for_framework("image-classification")["versions"]["1"]
    else:
        table = image_uris.config_for_framework("pytorch")[purpose]["versions"][f"{PYTORCH_VERSION}.0"]
    return sorted(table["registries"])


def image_uri(stack: Stack, algorithm: str, purpose: str) -> str:
    """The image URI for `algorithm` ("pytorch" or "builtin") and `purpose` ("training" or "inference")."""
    if not Token.is_unresolved(stack.region):
        return _retrieve(algorithm, purpose, stack.region)
    mapping_id = f"{algorithm.capitalize()}{purpose.capitalize()}Image"
    mapping = stack.node.try_find_child(mapping_id) or CfnMapping(
        stack,
        mapping_id,
        mapping={region: {"uri": _retrieve(algorithm, purpose, region)} for region in _regions(algorithm, purpose)},
    )
    return mapping.find_in_map(Aws.REGION, "uri")


def repository_arn(stack: Stack, algorithm: str, purpose: str) -> str:
    """The ARN of the image's ECR repository, for IAM: in the AWS-owned account of the image URI, which differs
    by region (the URI's first label)."""
    uri = image_uri(stack, algorithm, purpose)
    account = uri.split(".")[0] if not Token.is_unresolved(uri) else Fn.select(0, Fn.split(".", uri))
    name = "image-classification" if algorithm == "builtin" else f"pytorch-{purpose}"
    return f"arn:{Aws.PARTITION}:ecr:{Aws.REGION}:{account}:repository/{name}"
