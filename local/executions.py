"""Start executions of a state machine, as a console user would, and wait for them."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from tqdm import tqdm


def run_execution(
    stepfunctions, state_machine_arn: str, execution_input: dict, poll_seconds: float = 0.01, timeout: float = 300
) -> dict:
    """Start one execution and answer its final `describe_execution`."""
    arn = stepfunctions.start_execution(stateMachineArn=state_machine_arn, input=json.dumps(execution_input))[
        "executionArn"
    ]
    deadline = time.monotonic() + timeout
    while (described := stepfunctions.describe_execution(executionArn=arn))["status"] == "RUNNING":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{arn} still running after {timeout} s")
        time.sleep(poll_seconds)
    return described


def run_executions(
    state_machine_arn: str, bucket: str, keys: list[str], concurrency: int, progress: bool = True
) -> list[dict]:
    """One execution per image key, `concurrency` at a time; answers each final description with its "key"."""
    stepfunctions = boto3.client("stepfunctions")

    def run_one(key: str) -> dict:
        return {"key": key, **run_execution(stepfunctions, state_machine_arn, {"s3_bucket": bucket, "s3_key": key})}

    with ThreadPoolExecutor(concurrency) as pool:
        return list(
            tqdm(pool.map(run_one, keys), total=len(keys), desc="executions", unit="image", disable=not progress)
        )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] if ordered else float("nan")
