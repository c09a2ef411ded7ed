"""What the review Lambdas share: the DynamoDB items of the review table and the times they hold.

Waiting task: pk "task", sk "<requested_at>#<execution name>" (the task's id; sorted oldest first), with the
task token, the execution's ARN, the photo, the model's `inferences` (a JSON string), the filter's `reason`,
`requested_at`, `deadline` (epoch seconds after which Step Functions no longer takes an answer) and
`expires_at` (a day later, the table's TTL attribute).
Answer: pk "answer", sk the execution's name, written only when no answer is there yet, so that of two
reviewers exactly one answer counts.
"""

import datetime
import functools

import boto3

TASK_PK = "task"
ANSWER_PK = "answer"
NEITHER = "neither"
# How long an item outlives its deadline before DynamoDB's TTL removes it.
EXPIRY_GRACE_SECONDS = 24 * 3600


@functools.cache
def dynamodb_client():
    return boto3.client("dynamodb")


def execution_name(execution_arn: str) -> str:
    """The last part of `arn:aws:states:<region>:<account>:execution:<state machine>:<name>`."""
    return execution_arn.rsplit(":", 1)[-1]


def task_id(requested_at: str, name: str) -> str:
    return f"{requested_at}#{name}"


def execution_of_task(task: str) -> str:
    """The execution name in a task's id; a timestamp holds no '#'."""
    return task.partition("#")[2]


def epoch(timestamp: str) -> float:
    """Seconds since 1970 of an ISO 8601 time such as Step Functions' `2026-01-02T03:04:05.678Z`."""
    parsed = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def iso(seconds: float) -> str:
    """`seconds` since 1970 written as Step Functions writes times (milliseconds, UTC, `Z`)."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def to_item(values: dict) -> dict:
    """A flat dict of strings and numbers as DynamoDB attribute values."""
    return {
        name: {"S": value} if isinstance(value, str) else {"N": repr(value)}
        for name, value in values.items()
        if value is not None
    }


def from_item(item: dict) -> dict:
    return {name: value["S"] if "S" in value else float(value["N"]) for name, value in item.items()}


def most_likely(inferences: list[float], classes: list[str]) -> tuple[str, float]:
    """The model's answer, counting `neither` (1 - the sum of the probabilities), and `neither` itself."""
    neither = round(max(0.0, 1 - sum(inferences)), 6)
    scores = [*inferences, neither]
    names = [classes[i] if i < len(classes) else f"class {i}" for i in range(len(inferences))] + [NEITHER]
    return names[scores.index(max(scores))], neither
