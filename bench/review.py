"""Time the review step on this machine: `.venv/bin/python bench/review.py`.

    .venv/bin/python bench/review.py [--rounds 5] [--tasks 10000] [--state-dir .scones]

Runs on what `make run` brings up (and brings it up first if it is down: synth, stage, train, deploy), with the
review page in headless Chromium (Debian's `chromium`, driven by Playwright), as a reviewer sees it:
- pickup: a real photo of something that is neither a bicycle nor a motorcycle (../shared/data/real-photos-dev
  `other/`) starts an execution; the time from its start until its card is on the open page (goal 1 s). Photos
  the model is confident about end at once and are not counted: the bench takes the next one.
- resume: the time from clicking "neither" on that card until the execution has ended (goal 1 s).
- paging: `--tasks` more waiting tasks go through the review queue and the intake Lambda, as the state machine
  sends them (tokens of no execution: they are only listed); then the list API's latency for the first page
  and for a page after half of them, and the time until the page shows its first cards with them all waiting.
  The bench deletes those tasks from the review table when it is done.
Reports medians and maxima; records the machine's load; writes bench/results/review.json.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import boto3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402
from local.__main__ import ensure_up  # noqa: E402
from training.etl import SHARED_ARCHIVE  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "review.json"
OTHER_PHOTOS = SHARED_ARCHIVE.parent / "real-photos-dev" / "other"
GOALS = {"pickup_s max": ("<=", 1.0), "resume_s max": ("<=", 1.0)}
POLL_SECONDS = 0.01


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout} s")
        time.sleep(POLL_SECONDS)
    return value


def timed_get(info: dict, path: str) -> tuple[float, dict]:
    started = time.perf_counter()
    request = urllib.request.Request(info["url"] + path, headers={"authorization": f"Bearer {info['token']}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    return time.perf_counter() - started, body


def pickup_and_resume(page, deployed: dict, rounds: int) -> dict:
    stepfunctions, s3 = boto3.client("stepfunctions"), boto3.client("s3")
    machine = deployed["state_machines"]["classify-image"]
    pickups, resumes, confident = [], [], 0
    for photo in sorted(OTHER_PHOTOS.iterdir()):
        if len(pickups) == rounds:
            break
        key = f"bench/review/{photo.name}"
        s3.upload_file(str(photo), deployed["bucket"], key)
        started = time.perf_counter()
        arn = stepfunctions.start_execution(
            stateMachineArn=machine, input=json.dumps({"s3_bucket": deployed["bucket"], "s3_key": key})
        )["executionArn"]
        name = arn.rsplit(":", 1)[1]
        card = page.locator(f'[data-task$="#{name}"]')
        while True:
            if card.count():
                pickups.append(time.perf_counter() - started)
                break
            if stepfunctions.describe_execution(executionArn=arn)["status"] != "RUNNING":
                confident += 1
                break
            if time.perf_counter() - started > 30:
                raise TimeoutError(f"{name} is neither done nor on the page after 30 s")
            time.sleep(POLL_SECONDS)
        if len(pickups) > len(resumes):
            clicked = time.perf_counter()
            card.locator('[data-class="neither"]').click()
            wait_until(
                lambda: stepfunctions.describe_execution(executionArn=arn)["status"] != "RUNNING",  # noqa: B023
                30,
                f"{name} still running",
            )
            resumes.append(time.perf_counter() - clicked)
    return {
        "rounds": len(pickups),
        "confident_photos_skipped": confident,
        "pickup_s": summary(pickups),
        "resume_s": summary(resumes),
    }


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3), "runs": len(values)}


def fill(deployed: dict, count: int) -> str:
    """`count` waiting tasks through the review queue (the intake Lambda writes them); answers the table's name."""
    sqs = boto3.client("sqs")
    queue = next(url for url in sqs.list_queues()["QueueUrls"] if url.endswith("-review"))
    now = datetime.datetime.now(datetime.UTC)
    for start in range(0, count, 10):
        entries = []
        for index in range(start, min(count, start + 10)):
            name = f"bench-{index:05d}"
            requested = (now + datetime.timedelta(milliseconds=index)).isoformat().replace("+00:00", "Z")
            body = {
                "task_token": f"bench-token-{index}",
                "execution_arn": f"arn:aws:states:us-east-1:123456789012:execution:bench:{name}",
                "requested_at": requested,
                "s3_bucket": deployed["bucket"],
                "s3_key": f"bench/review/none-{index}.jpg",
                "inferences": [0.5, 0.4],
                "reason": json.dumps({"errorMessage": "bench task", "errorType": "ThresholdConfidenceNotMet"}),
            }
            entries.append({"Id": str(index), "MessageBody": json.dumps(body)})
        sqs.send_message_batch(QueueUrl=queue, Entries=entries)
    table = next(name for name in boto3.client("dynamodb").list_tables()["TableNames"] if name.endswith("-review"))
    return table


def clean(table: str) -> None:
    dynamodb = boto3.client("dynamodb")
    keys, start = [], None
    while True:
        page = dynamodb.query(
            TableName=table,
            KeyConditionExpression="pk = :task",
            ExpressionAttributeValues={":task": {"S": "task"}},
            ProjectionExpression="pk, sk",
            **({"ExclusiveStartKey": start} if start else {}),
        )
        keys += [item for item in page["Items"] if "#bench-" in item["sk"]["S"]]
        start = page.get("LastEvaluatedKey")
        if not start:
            break
    for index in range(0, len(keys), 25):
        batch = [{"DeleteRequest": {"Key": key}} for key in keys[index : index + 25]]
        dynamodb.batch_write_item(RequestItems={table: batch})


def paging(browser, info: dict, deployed: dict, count: int) -> dict:
    started = time.perf_counter()
    table = fill(deployed, count)
    filled = time.perf_counter() - started
    try:
        first = [timed_get(info, "/api/tasks?limit=25")[0] for _ in range(20)]
        cursor = ""
        for _ in range(count // 200):  # to about the middle, 100 tasks a page
            cursor = timed_get(info, f"/api/tasks?limit=100&after={quote(cursor)}")[1]["next"] or ""
        middle = [timed_get(info, f"/api/tasks?limit=25&after={quote(cursor)}")[0] for _ in range(20)]
        page = browser.new_page()
        opened = time.perf_counter()
        page.goto(f"{info['url']}/#token={info['token']}")
        page.locator("[data-task]").first.wait_for(timeout=30_000)
        shown = time.perf_counter() - opened
        cards = page.locator("[data-task]").count()
        page.close()
    finally:
        clean(table)
    return {
        "waiting_tasks": count,
        "fill_s": round(filled, 1),
        "first_page_ms": summary([seconds * 1000 for seconds in first]),
        "middle_page_ms": summary([seconds * 1000 for seconds in middle]),
        "page_first_cards_s": round(shown, 3),
        "cards_on_a_page": cards,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".scones")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("bench/review.py: no chromium on PATH: `make chromium` installs Debian's")
    os.chdir(ROOT)
    deployed = ensure_up(args.state_dir.resolve(), (ROOT / "cdk.out").resolve(), None)
    info = deployed.get("review")
    if not info:
        sys.exit("bench/review.py: the deployed stacks have no review step (synthesized with -c review=false)")
    from playwright.sync_api import sync_playwright

    load_before = os.getloadavg()[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{info['url']}/#token={info['token']}")
            results = {"pickup_and_resume": pickup_and_resume(page, deployed, args.rounds)}
            page.close()
            results["paging"] = paging(browser, info, deployed, args.tasks)
        finally:
            browser.close()
    flat = {f"{name} max": results["pickup_and_resume"][name]["max"] for name in ("pickup_s", "resume_s")}
    results["goals"] = {
        name: {"goal": f"{op} {bound}", "value": flat[name], "met": flat[name] <= bound}
        for name, (op, bound) in GOALS.items()
    }
    results["machine"] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    results["date"] = datetime.date.today().isoformat()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
