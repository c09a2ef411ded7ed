"""Review intake: the review queue's messages become waiting tasks in the review table.

The classify state machine's "Ask a reviewer" state sends one message per uncertain photo, with the task
token that resumes its execution. Each becomes the waiting-task item of `common.review` (one PutItem; a
redelivered message writes the same item again). A record that is not such a message fails alone
(`batchItemFailures`, the SqsEventSource's ReportBatchItemFailures) with InvalidTaskMessage saying what is
wrong, so the queue's other records are not delivered again; after its retries it lands in the dead-letter
queue. Each call prints one JSON log line: records received, tasks written, and each failure.
"""

import contextlib
import json
import math

from common import InvalidConfiguration, InvalidEvent, StepError, as_probabilities, setting
from common.review import EXPIRY_GRACE_SECONDS, TASK_PK, dynamodb_client, epoch, execution_name, task_id, to_item

MESSAGE_SHAPE = (
    '{"task_token", "execution_arn", "requested_at", "s3_bucket", "s3_key", "inferences", "reason"}, as the '
    'classify state machine\'s "Ask a reviewer" state sends it'
)


class InvalidTaskMessage(StepError):
    pass


def timeout_seconds() -> float:
    text = setting("REVIEW_TIMEOUT_SECONDS")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise InvalidConfiguration(
            f"REVIEW_TIMEOUT_SECONDS={text!r} is not a positive number of seconds; the review stack sets it from "
            "-c review_timeout_hours."
        )
    return value


def text_field(message: dict, name: str) -> str:
    value = message.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidTaskMessage(
            f"The message's {name} is {value!r}, not a non-empty string; expected {MESSAGE_SHAPE}."
        )
    return value


def reason_text(reason) -> str:
    """The filter's errorMessage: `reason` is the Cause Step Functions caught, a JSON string, or plain text."""
    if not isinstance(reason, str):
        return ""
    try:
        cause = json.loads(reason)
    except ValueError:
        return reason
    return str(cause.get("errorMessage", reason)) if isinstance(cause, dict) else reason


def task_item(body: str, timeout: float) -> dict:
    """The waiting-task item of one message's body; InvalidTaskMessage says what is wrong with it."""
    try:
        message = json.loads(body)
    except (TypeError, ValueError) as error:
        raise InvalidTaskMessage(
            f"The message is not JSON ({error}): {str(body)[:100]!r}; expected {MESSAGE_SHAPE}."
        ) from None
    if not isinstance(message, dict):
        raise InvalidTaskMessage(f"The message is a {type(message).__name__}, not a JSON object {MESSAGE_SHAPE}.")
    token, execution_arn, requested_at, bucket, key = (
        text_field(message, name) for name in ("task_token", "execution_arn", "requested_at", "s3_bucket", "s3_key")
    )
    if not execution_arn.startswith("arn:") or ":execution:" not in execution_arn:
        raise InvalidTaskMessage(f"execution_arn {execution_arn!r} is not the ARN of a Step Functions execution.")
    try:
        requested = epoch(requested_at)
    except ValueError:
        raise InvalidTaskMessage(
            f"requested_at {requested_at!r} is not an ISO 8601 time such as $$.State.EnteredTime."
        ) from None
    inferences = message.get("inferences")
    if isinstance(inferences, str):
        with contextlib.suppress(ValueError):
            inferences = json.loads(inferences)
    probabilities = as_probabilities(inferences)
    if probabilities is None:
        raise InvalidTaskMessage(
            f"inferences of s3://{bucket}/{key} are {message.get('inferences')!r}, not a list of class probabilities."
        )
    deadline = math.ceil(requested + timeout)
    return to_item(
        {
            "pk": TASK_PK,
            "sk": task_id(requested_at, execution_name(execution_arn)),
            "task_token": token,
            "execution_arn": execution_arn,
            "s3_bucket": bucket,
            "s3_key": key,
            "inferences": json.dumps(probabilities),
            "reason": reason_text(message.get("reason")),
            "requested_at": requested_at,
            "deadline": deadline,
            "expires_at": deadline + EXPIRY_GRACE_SECONDS,
        }
    )


def handler(event, context):
    records = event.get("Records") if isinstance(event, dict) else None
    if not isinstance(records, list):
        raise InvalidEvent("The event has no Records: review_intake takes the review queue's messages (SQS events).")
    table, timeout = setting("TABLE_NAME"), timeout_seconds()
    failures, problems, written = [], [], []
    for record in records:
        try:
            item = task_item(record.get("body"), timeout)
            dynamodb_client().put_item(TableName=table, Item=item)
            written.append(item["sk"]["S"])
        except Exception as error:  # one record's failure is reported for that record alone
            failures.append({"itemIdentifier": record.get("messageId", "")})
            problems.append({"message": record.get("messageId"), "error": type(error).__name__, "detail": str(error)})
    print(json.dumps({"received": len(records), "written": written, "failed": problems}))
    return {"batchItemFailures": failures}
