"""The reviewers' answers (reviews/YYYY/MM/DD/<execution>.json, one JSON line each): how often a person
overruled the model, per model class and kind of answer, for the capture report.

A line that cannot be read is counted and named (file and line); it never stops the report.
"""

from __future__ import annotations

import html
import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from monitoring.captures import Failure, parse_time, split_s3_uri

KINDS = ("task", "correction")  # an uncertain photo a person answered; a person correcting an accepted answer
NEITHER = "neither"
REQUIRED = ("execution", "s3_key", "model_class", "class", "answered_at", "kind")
FAILURES_NAMED = 20  # unreadable lines named in the report; the rest are counted
DAY_FOLDER = re.compile(r"(?:^|/)(\d{4})/(\d{2})/(\d{2})/[^/]*$")
S3_READERS = 8  # one GET per answer: read several at once
NO_ANSWERS = "no reviewed answers yet"


class ReviewError(Exception):
    """The answers' location cannot be read at all (no such folder or bucket); the CLI prints it as one line."""


@dataclass(frozen=True)
class Answer:
    execution: str
    model_class: str
    reviewer_class: str
    kind: str
    answered_at: float


@dataclass
class Reviews:
    source: str
    answers: list[Answer] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    files: int = 0


# ---------------------------------------------------------------------------------------------- reading


def read_reviews(location: str, since: datetime | None = None, until: datetime | None = None) -> Reviews:
    """The answers under `location` (a folder or s3://bucket/prefix/) answered in [since, until)."""
    names = [name for name in _list(location) if name.endswith(".json") and _day_in_range(name, since, until)]
    reviews = Reviews(location, files=len(names))
    read = _s3_reader() if location.startswith("s3://") else _file_reader
    with ThreadPoolExecutor(S3_READERS if location.startswith("s3://") else 1) as pool:
        for name, content in zip(names, pool.map(read, names), strict=True):
            if isinstance(content, Failure):
                reviews.failures.append(content)
                continue
            for number, line in enumerate(content.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    answer = parse_line(line)
                except ValueError as error:
                    reviews.failures.append(Failure(name, number, str(error)))
                    continue
                if (since is None or answer.answered_at >= since.timestamp()) and (
                    until is None or answer.answered_at < until.timestamp()
                ):
                    reviews.answers.append(answer)
    return reviews


def _list(location: str) -> list[str]:
    if not location.startswith("s3://"):
        folder = Path(location)
        if not folder.is_dir():
            raise ReviewError(f"no reviews folder {location}: give the folder or s3://bucket/reviews/ of the answers")
        return sorted(str(path) for path in folder.rglob("*") if path.is_file())
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_uri(location)
    try:
        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(f"s3://{bucket}/{entry['Key']}" for page in pages for entry in page.get("Contents", []))
    except (BotoCoreError, ClientError) as error:
        raise ReviewError(f"cannot list the reviews under {location}: {error}") from None


def _day_in_range(name: str, since: datetime | None, until: datetime | None) -> bool:
    """False only for a file in a day folder wholly outside [since, until)."""
    match = DAY_FOLDER.search(name)
    if not match:
        return True
    try:
        start = datetime(*map(int, match.groups()), tzinfo=UTC).timestamp()
    except ValueError:  # not a date after all: read it
        return True
    return (since is None or start + 86400 > since.timestamp()) and (until is None or start < until.timestamp())


def _file_reader(name: str) -> str | Failure:
    try:
        return Path(name).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:  # named in the report, not fatal
        return Failure(name, 0, f"cannot read the file: {type(error).__name__}: {error}")


def _s3_reader():
    """A reader of s3:// names sharing one client (thread-safe; making one per object costs more than the GET)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3")

    def read(name: str) -> str | Failure:
        bucket, key = split_s3_uri(name)
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
        except (UnicodeDecodeError, BotoCoreError, ClientError) as error:  # named in the report, not fatal
            return Failure(name, 0, f"cannot read the file: {type(error).__name__}: {error}")

    return read


def parse_line(line: str) -> Answer:
    """One answer line; ValueError saying what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error}") from None
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but {type(record).__name__}")
    missing = [name for name in REQUIRED if not isinstance(record.get(name), str) or not record[name]]
    if missing:
        raise ValueError(f"missing or not a text: {', '.join(missing)}")
    if record["kind"] not in KINDS:
        raise ValueError(f"kind {record['kind']!r} is neither of {', '.join(KINDS)}")
    try:
        answered_at = parse_time(record["answered_at"])
    except ValueError:
        raise ValueError(f"answered_at {record['answered_at']!r} is not an ISO time") from None
    return Answer(record["execution"], record["model_class"], record["class"], record["kind"], answered_at)


# -------------------------------------------------------------------------------------------- summary


def summarise(reviews: Reviews, classes: list[str] | tuple[str, ...] = ()) -> dict:
    """The `reviews` object of the report's summary.json. `classes`: the model's labels, in their order."""
    seen = {answer.model_class for answer in reviews.answers} | {answer.reviewer_class for answer in reviews.answers}
    order = [*classes, *sorted(seen - {*classes, NEITHER}), NEITHER]
    times = [answer.answered_at for answer in reviews.answers]
    return {
        "source": reviews.source,
        "files": reviews.files,
        "unreadable_lines": len(reviews.failures),
        "failures": [asdict(failure) for failure in reviews.failures[:FAILURES_NAMED]],
        "first_answer": _iso(min(times)) if times else None,
        "last_answer": _iso(max(times)) if times else None,
        "classes": order,  # the reviewers' classes, the columns of each row's `reviewer_classes`
        **_counts(reviews.answers, order),
        "kinds": {kind: _counts([each for each in reviews.answers if each.kind == kind], order) for kind in KINDS},
    }


def _counts(answers: list[Answer], order: list[str]) -> dict:
    """Answers, overruled and agreement in all, and the same per model class with the reviewers' classes."""
    pairs = Counter((answer.model_class, answer.reviewer_class) for answer in answers)
    per_class = {}
    for model_class in order:
        row = {reviewer_class: pairs[model_class, reviewer_class] for reviewer_class in order}
        if any(row.values()):
            per_class[model_class] = _agreement(sum(row.values()), row[model_class]) | {"reviewer_classes": row}
    return _agreement(len(answers), sum(pairs[name, name] for name in order)) | {"model_classes": per_class}


def _agreement(answers: int, agreed: int) -> dict:
    return {"answers": answers, "overruled": answers - agreed, "agreement": agreed / answers if answers else None}


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------ chart and html


def chart(summary: dict):
    """A matplotlib figure: answers and overruled per model class, tasks and corrections stacked."""
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary["model_classes"])
    positions = np.arange(len(names))
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    colors = {"answers": ("tab:blue", "lightsteelblue"), "overruled": ("tab:red", "lightsalmon")}
    for offset, measure in ((-0.2, "answers"), (0.2, "overruled")):
        bottom = np.zeros(len(names))
        for kind, color in zip(KINDS, colors[measure], strict=True):
            rows = summary["kinds"][kind]["model_classes"]
            values = np.array([rows.get(name, {}).get(measure, 0) for name in names])
            axis.bar(positions + offset, values, 0.4, bottom=bottom, color=color, label=f"{measure} ({kind})")
            bottom += values
    tallest = max(row["answers"] for row in summary["model_classes"].values())
    axis.set_ylim(0, tallest * 1.4)  # room for the legend above the bars
    axis.set_xticks(positions, names)
    axis.set(title="reviewed answers per model class", xlabel="model's class", ylabel="answers")
    axis.yaxis.get_major_locator().set_params(integer=True)
    axis.legend(loc="upper right", fontsize=8)
    return figure


def section_html(summary: dict | None, picture: str = "") -> str:
    """The report's Reviews section; `picture` an <img> of the chart."""
    if not summary or not summary["answers"]:
        where = f" under {html.escape(summary['source'])}" if summary else ""
        return f"<h2>Reviews</h2><p>{NO_ANSWERS}{where}.</p>{_failures_html(summary)}"
    agreement = f"{summary['agreement']:.1%}"
    tables = "".join(
        f"<h3>{title} ({counts['answers']})</h3>{_table(counts, summary['classes'])}"
        for title, counts in (("All answers", summary), *((f"{kind}s", summary["kinds"][kind]) for kind in KINDS))
        if counts["answers"]
    )
    return f"""<h2>Reviews</h2>
<p>{summary["answers"]} reviewed answers from {summary["files"]} files under {html.escape(summary["source"])},
{summary["first_answer"]} to {summary["last_answer"]}: the reviewers overruled the model {summary["overruled"]}
time(s), agreeing with it {agreement} of the time.</p>
<p>Rows: the model's class; columns: the reviewers' (tasks: uncertain photos a person answered; corrections:
accepted answers a person corrected).</p>
{tables}{picture}{_failures_html(summary)}"""


def _table(counts: dict, classes: list[str]) -> str:
    head = "".join(f"<th>reviewer: {html.escape(name)}</th>" for name in classes)
    rows = "".join(
        f"<tr><td>{html.escape(model_class)}</td><td>{row['answers']}</td><td>{row['overruled']}</td>"
        f"<td>{row['agreement']:.1%}</td>"
        + "".join(f"<td>{row['reviewer_classes'][name]}</td>" for name in classes)
        + "</tr>"
        for model_class, row in counts["model_classes"].items()
    )
    head = f"<th>model's class</th><th>answers</th><th>overruled</th><th>agreement</th>{head}"
    return f"<table><tr>{head}</tr>{rows}</table>"


def _failures_html(summary: dict | None) -> str:
    if not summary or not summary["unreadable_lines"]:
        return ""
    named = "".join(
        f"<li>{html.escape(failure['file'])}{_line(failure)}: {html.escape(failure['reason'])}</li>"
        for failure in summary["failures"]
    )
    more = summary["unreadable_lines"] - len(summary["failures"])
    return f"<p>{summary['unreadable_lines']} unreadable line(s), left out:</p><ul>{named}</ul>" + (
        f"<p>and {more} more.</p>" if more else ""
    )


def _line(failure: dict) -> str:
    return f", line {failure['line']}" if failure["line"] else ""  # line 0: the whole file could not be read
