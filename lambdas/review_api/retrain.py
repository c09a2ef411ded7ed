"""Ask for a retraining each time reviewers have written RETRAIN_AFTER_LABELS labels (unset: never).

Each label written adds one to the review table's item pk "counter", sk "labels-since-training", atomically. An
answer that brings it to N or more claims the labels it saw: a conditional update takes them off only while the
count still holds them, so that of two answers crossing N together exactly one claims (a label counted meanwhile
stays counted, or is claimed on a second try when it completes N itself). The claim puts one event on the default
bus, which the monitoring stack's rule `<prefix>-retrain-on-labels` turns into an execution of the training state
machine. A failed PutEvents is logged and gives the labels back, so the next label asks again; the answer itself
succeeds either way.
"""

import functools
import json
import os

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from common import InvalidConfiguration, setting
from common.review import dynamodb_client, to_item

COUNTER = {"pk": "counter", "sk": "labels-since-training"}
SOURCE = "scones.review"
DETAIL_TYPE = "Reviewed labels accumulated"
LABELS_PREFIX = "labels/"
# Claims lost to other answers before giving up; the next label claims what is left.
CLAIM_ATTEMPTS = 5


@functools.cache
def events_client():
    return boto3.client("events")


def labels_per_retraining() -> int | None:
    text = os.environ.get("RETRAIN_AFTER_LABELS")
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise InvalidConfiguration(
            f"RETRAIN_AFTER_LABELS={text!r} is not a whole number of labels of 1 or more: the review stack sets it "
            "from -c retrain_after_labels; unset it to start no retraining."
        )
    return int(text)


def add(amount: int) -> int:
    """Add `amount` to the count; answers the new count."""
    answer = dynamodb_client().update_item(
        TableName=setting("TABLE_NAME"),
        Key=to_item(COUNTER),
        UpdateExpression="ADD labels :amount",
        ExpressionAttributeValues={":amount": {"N": str(amount)}},
        ReturnValues="UPDATED_NEW",
    )
    return int(answer["Attributes"]["labels"]["N"])


def claim(seen: int, wanted: int) -> int | None:
    """Take the `seen` labels off the count while it still holds them; if another answer took some first, try
    again with what is left while that is `wanted` or more. Answers the labels taken, None when too few are left."""
    for _ in range(CLAIM_ATTEMPTS):
        try:
            dynamodb_client().update_item(
                TableName=setting("TABLE_NAME"),
                Key=to_item(COUNTER),
                UpdateExpression="ADD labels :taken",
                ConditionExpression="labels >= :seen",
                ExpressionAttributeValues={":taken": {"N": str(-seen)}, ":seen": {"N": str(seen)}},
            )
            return seen
        except ClientError as error:
            if error.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
        found = dynamodb_client().get_item(TableName=setting("TABLE_NAME"), Key=to_item(COUNTER), ConsistentRead=True)
        seen = int(found["Item"]["labels"]["N"])
        if seen < wanted:
            return None
    return None


def count_label(bucket: str) -> bool:
    """Count one label written in `bucket`; True when it completed N labels and the retraining was asked for."""
    wanted = labels_per_retraining()
    if wanted is None:
        return False
    try:
        labels = add(1)
        if labels < wanted or (labels := claim(labels, wanted)) is None:
            return False
    except (BotoCoreError, ClientError) as error:  # the label is written and the answer stands all the same
        print(json.dumps({"retraining": "label not counted", "error": str(error)}))
        return False
    detail = {
        "labels": labels,
        "labels_prefix": f"s3://{bucket}/{LABELS_PREFIX}",
        "state_machine": setting("STATE_MACHINE_ARN"),
    }
    try:
        answer = events_client().put_events(
            Entries=[{"Source": SOURCE, "DetailType": DETAIL_TYPE, "Detail": json.dumps(detail)}]
        )
        failure = answer["Entries"][0].get("ErrorMessage") if answer.get("FailedEntryCount") else None
    except (BotoCoreError, ClientError) as error:
        failure = str(error)
    if failure:
        print(json.dumps({"retraining": "not requested", "labels": labels, "error": failure}))
        try:
            add(labels)  # the next label asks again
        except (BotoCoreError, ClientError) as error:
            print(json.dumps({"retraining": f"{labels} labels not given back", "error": str(error)}))
        return False
    print(json.dumps({"retraining": "requested", **detail}))
    return True
