"""Start executions of a state machine, as a console user would, and wait for them."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from tqdm import tqdm


def run_execution(
    stepfunctions,
    state_machine_arn: str,
    execution_input: dict,
    poll_seconds: float = 0.01,
    timeout: float = 300,
    max_poll_seconds: float = 0.1,
) -> dict:
    """Start one execution and answer its final `describe_execution`, or the running one with `"waiting": True`
    once it waits for a callback (a person's review): that is its outcome until someone answers.

    Polls after `poll_seconds`, then each time half again as long, up to `max_poll_seconds`: an execution
    that waits its turn is not asked after a hundred times a second (at 8 at a time those questions were
    half of the local AWS's work, each 1.4 ms of its CPU), and a short one is still seen done within ms."""
    arn = stepfunctions.start_execution(stateMachineArn=state_machine_arn, input=json.dumps(execution_input))[
        "executionArn"
    ]
    deadline = time.monotonic() + timeout
    pause = poll_seconds
    while True:
        time.sleep(pause)
        described = stepfunctions.describe_execution(executionArn=arn)
        if described["status"] != "RUNNING":
            return described
        if pause >= max_poll_seconds and waits_for_callback(stepfunctions, arn):
            return {**described, "waiting": True}
        if time.monotonic() > deadline:
            raise TimeoutError(f"{arn} still running after {timeout} s")
        pause = min(max_poll_seconds, pause * 1.5)


def waits_for_callback(stepfunctions, execution_arn: str) -> bool:
    """Whether the execution's newest event is a task handed out with its token (`.waitForTaskToken`)."""
    events = stepfunctions.get_execution_history(executionArn=execution_arn, reverseOrder=True, maxResults=1)["events"]
    # moto answers the whole history, oldest first, whatever the order and size asked for
    newest = max(events, key=lambda event: event["id"], default={})
    return newest.get("type") == "TaskSubmitted" and newest["taskSubmittedEventDetails"]["resource"].endswith(
        ".waitForTaskToken"
    )


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
