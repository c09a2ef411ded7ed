"""The local stack as `make run` builds it (moto and the endpoint server as background processes, the synthesized
stacks deployed into them), under a fault: the endpoint stopped in the middle of a batch and started again."""

import io
import json
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor, wait

import boto3
import pytest
from PIL import Image

from conftest import assembly_directory
from local.__main__ import MODEL_PARAMETER, LocalRun
from local.executions import run_execution

pytestmark = pytest.mark.slow

# A model whose inference.py always answers a confident bicycle: the fault, not the model, is under test.
CONFIDENT_MODEL = '''
import json

def model_fn(model_dir):
    return None

def input_fn(request_body, content_type):
    return request_body

def predict_fn(data, model):
    return [0.97, 0.03]

def output_fn(prediction, accept):
    return json.dumps(prediction), "application/json"
'''
IMAGES = 24


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("state")
    run = LocalRun(state_dir, assembly_directory(), "dev")
    info = run.start_aws()
    try:
        deployment = run.deploy([run.stack("Data")])
        bucket = deployment.created(run.stack("Data"), "AWS::S3::Bucket")["Data666C94C7"]["Ref"]
        s3 = boto3.client("s3")
        model = io.BytesIO()
        with tarfile.open(fileobj=model, mode="w:gz") as archive:
            code = CONFIDENT_MODEL.encode()
            member = tarfile.TarInfo("code/inference.py")
            member.size = len(code)
            archive.addfile(member, io.BytesIO(code))
        s3.put_object(Bucket=bucket, Key="models/confident/output/model.tar.gz", Body=model.getvalue())
        boto3.client("ssm").put_parameter(Name=MODEL_PARAMETER.format(env="dev"), Type="String",
                                          Value=f"s3://{bucket}/models/confident/output/model.tar.gz")
        run.deploy([run.stack("Workflow"), run.stack("Endpoint")])
        run.serve_endpoint(deployment, info["sagemaker_runtime"])
        for number in range(IMAGES):
            image = io.BytesIO()
            Image.new("RGB", (32, 32), (number * 10, 40, 90)).save(image, "PNG")
            s3.put_object(Bucket=bucket, Key=f"test/image_{number:02d}.png", Body=image.getvalue())
        state_machine = next(machine["Ref"] for machine in deployment.created(
            run.stack("Workflow"), "AWS::StepFunctions::StateMachine").values()
            if machine["Name"].endswith("-classify-image"))
        yield run, deployment, bucket, state_machine, info
    finally:
        run.endpoint.stop()
        run.aws.stop()


def test_executions_retry_through_an_endpoint_restart_and_complete(local_run):
    run, deployment, bucket, state_machine, info = local_run
    stepfunctions = boto3.client("stepfunctions")
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_execution, stepfunctions, state_machine,
                               {"s3_bucket": bucket, "s3_key": f"test/image_{number:02d}.png"})
                   for number in range(IMAGES)]
        while sum(future.done() for future in futures) < 3:
            time.sleep(0.05)
        assert run.endpoint.stop()
        time.sleep(1.5)
        run.serve_endpoint(deployment, info["sagemaker_runtime"])
        wait(futures)
    executions = [future.result() for future in futures]
    assert [(e["status"], e.get("error")) for e in executions] == [("SUCCEEDED", None)] * IMAGES
    assert {tuple(json.loads(e["output"])["inferences"]) for e in executions} == {(0.97, 0.03)}

    retried = []
    for execution in executions:
        events = stepfunctions.get_execution_history(executionArn=execution["executionArn"])["events"]
        errors = [e["taskFailedEventDetails"]["error"] for e in events if e["type"] == "TaskFailed"]
        if errors:
            retried.append(errors)
    # The executions in flight while the endpoint was down failed to connect, were retried, and completed.
    assert retried, "no execution ran while the endpoint was down"
    assert {error for errors in retried for error in errors} <= {"EndpointConnectionError", "ConnectionClosedError"}
