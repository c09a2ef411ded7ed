"""Upload a staged folder to the root of an S3 bucket, skipping the objects that already have its bytes."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from training.cifar import EtlError

UPLOAD_WORKERS = 16
CONTENT_TYPES = {
    ".png": "image/png",
    ".lst": "text/plain",
    ".json": "application/json",
    ".jpg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
}


class UploadFailed(EtlError):
    """S3 refused or could not be reached."""


def _staged_keys(s3, bucket: str, folders) -> set[str]:
    """The keys at the bucket root and under `folders`, from one listing each."""
    listings = [("", "/")] + [(f"{folder}/", "") for folder in sorted(set(folders))]
    return {
        entry["Key"]
        for prefix, delimiter in listings
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter=delimiter)
        for entry in page.get("Contents", [])
    }


def upload(
    out: Path, hashes: dict[str, str], bucket: str, s3_client=None, progress: bool = True, *, folders, last: str
) -> list[str]:
    """Upload the staged files to the same keys at the bucket root, `last` (dataset.json) last, skipping objects
    whose `sha256` metadata already matches; answers the keys uploaded. Objects are looked for at the bucket
    root and under `folders` (the image folders)."""
    import boto3  # here, not at the top: importing boto3 takes longer than staging two classes
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = s3_client or boto3.client("s3", config=Config(max_pool_connections=UPLOAD_WORKERS))

    def upload_file(key: str) -> bool:
        if key in present:
            try:
                if s3.head_object(Bucket=bucket, Key=key)["Metadata"].get("sha256") == hashes[key]:
                    return False
            except ClientError as error:
                if error.response["Error"]["Code"] not in ("404", "NoSuchKey"):
                    raise
        s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=(out / key).read_bytes(),
            Metadata={"sha256": hashes[key]},
            ContentType=CONTENT_TYPES[Path(key).suffix],
        )
        return True

    keys = sorted(key for key in hashes if key != last)
    try:
        present = _staged_keys(s3, bucket, folders)  # only these need a look at their checksum
        with ThreadPoolExecutor(UPLOAD_WORKERS) as pool:
            uploaded = [
                key
                for key, was_uploaded in zip(
                    keys,
                    tqdm(
                        pool.map(upload_file, keys),
                        total=len(keys),
                        desc=f"upload to s3://{bucket}",
                        unit="file",
                        disable=not progress,
                    ),
                    strict=True,
                )
                if was_uploaded
            ]
        return uploaded + ([last] if upload_file(last) else [])
    except (BotoCoreError, ClientError) as error:
        raise UploadFailed(f"cannot upload to s3://{bucket}: {error}") from None
