"""The SageMaker source directory: the files the training container runs, and nothing else.

`python -m training.fit --local` runs the training script from a copy of exactly these files, as the container
does, so a file missing from the list fails a local fit too. `pack` writes them as SageMaker's
`sourcedir.tar.gz` for the training stack to ship; the container extracts it into its code folder when
`sagemaker_submit_directory` names the archive, and runs `sagemaker_program` (`train.py`) from there.
"""

import gzip
import io
import shutil
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENTRY_POINT = "train.py"
FILES = (ENTRY_POINT, "model.py", "inference.py", "calibration.py")


def copy(directory: Path) -> Path:
    """The files copied into `directory`; answers the entry point's path there."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(HERE / name, directory / name)
    return directory / ENTRY_POINT


def pack(archive: Path) -> Path:
    """The files as a gzipped tar at `archive`, the same bytes for the same files (no times, owners or modes
    that differ between checkouts), so that its asset hash changes only when the code does."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in FILES:
            data = (HERE / name).read_bytes()
            member = tarfile.TarInfo(name)
            member.size, member.mode = len(data), 0o644
            tar.addfile(member, io.BytesIO(data))
    archive.parent.mkdir(parents=True, exist_ok=True)
    with open(archive, "wb") as file, gzip.GzipFile(filename="", mode="wb", fileobj=file, mtime=0) as zipped:
        zipped.write(buffer.getvalue())
    return archive
