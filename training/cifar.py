"""The CIFAR-100 python archive: where it comes from and what it holds.

The archive is the first of: a path or URL, `$SCONES_CIFAR100`, the cached copy (`$XDG_CACHE_HOME/scones/
cifar-100-python.tar.gz`, by default under `~/.cache`), a download of the official archive checked against its MD5.
It is read from the tar without extracting, through an unpickler that rebuilds only NumPy arrays, so that a
tampered archive cannot run code. `EtlError`, the base of every ETL failure, is here because this module is
the one the others build on.
"""

import hashlib
import http.client
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from numpy._core.multiarray import _reconstruct
from tqdm import tqdm

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
OFFICIAL_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
MEMBER_DIR = "cifar-100-python"
# The copies of the archive beside the checkout (see ../shared/data/README.md): the ten vehicle classes, and those
# with 84 non-vehicle classes, which the photo recipe learns as neither.
SHARED_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-100-python-vehicles.tar.gz"
SHARED_SUBSET_ARCHIVE = SHARED_ARCHIVE.with_name("cifar-100-python-subset.tar.gz")
# Real photographs beside them, which only measure a model (training/photo_check.py): never trained on.
SHARED_REAL_PHOTOS = SHARED_ARCHIVE.with_name("real-photos-dev")
IMAGE_SIDE = 32

# Every global the official pickles name (checked with pickletools): the pieces of a NumPy array.
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class EtlError(Exception):
    """A failure the user can fix; the command prints its message as one line."""


class SourceNotFound(EtlError):
    """The archive given as a path does not exist."""


class DownloadFailed(EtlError):
    """The archive could not be downloaded (typically: no internet)."""


class ChecksumMismatch(EtlError):
    """A downloaded archive is not the official one."""


class CorruptArchive(EtlError):
    """The archive cannot be read as CIFAR-100 (truncated, not a tar, missing members...)."""


class UnsafeArchive(EtlError):
    """The archive tries something a CIFAR-100 archive never does (code in a pickle, odd paths)."""


# ------------------------------------------------------------------------------------------ source


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scones"


def resolve_source(source: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The local archive to read: `source`, else $SCONES_CIFAR100, else the cached copy, else a download."""
    source = source or os.environ.get("SCONES_CIFAR100")
    cached = cache_dir() / ARCHIVE_NAME
    if source and not str(source).startswith(("http://", "https://")):
        path = Path(source).expanduser()
        if not path.is_file():
            raise SourceNotFound(f"no archive at {path}")
        return path
    if not cached.is_file():
        download(str(source or OFFICIAL_URL), cached, progress)
    return cached


def download(url: str, destination: Path, progress: bool = True) -> None:
    """Download `url` to `destination`, which appears only once its MD5 is the official archive's."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    md5 = hashlib.md5()
    try:
        with (
            urllib.request.urlopen(url, timeout=30) as response,
            open(partial, "wb") as file,
            tqdm(
                total=int(response.headers.get("Content-Length") or 0) or None,
                unit="B",
                unit_scale=True,
                desc=f"download {destination.name}",
                disable=not progress,
            ) as bar,
        ):
            while chunk := response.read(1 << 20):
                file.write(chunk)
                md5.update(chunk)
                bar.update(len(chunk))
        if md5.hexdigest() != OFFICIAL_MD5:
            raise ChecksumMismatch(
                f"{url} has MD5 {md5.hexdigest()}, not the official archive's {OFFICIAL_MD5}; "
                "to use another archive, download it and pass its path with --source"
            )
        os.replace(partial, destination)
    except (OSError, http.client.HTTPException) as error:
        raise DownloadFailed(
            f"cannot download {url} ({getattr(error, 'reason', error)}); without internet, "
            "pass a local copy with --source PATH or SCONES_CIFAR100=PATH"
        ) from None
    finally:
        partial.unlink(missing_ok=True)


def sha256_of_file(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------- archive


@dataclass
class Split:
    """One archive member's images: CIFAR file names, fine-label ids and rows of 3072 bytes."""

    filenames: list[str]
    fine_labels: np.ndarray
    data: np.ndarray


@dataclass
class Cifar100:
    fine_label_names: list[str]
    train: Split
    test: Split


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds the archive's dicts, lists and NumPy arrays and refuses every other global,
    so that a tampered archive cannot run code."""

    def __init__(self, file, member: str, encoding: str):
        super().__init__(file, encoding=encoding)
        self.member = member

    def find_class(self, module, name):
        if (module, name) not in SAFE_GLOBALS:
            allowed = ", ".join(".".join(key) for key in SAFE_GLOBALS)
            raise UnsafeArchive(
                f"archive member {self.member} asks for {module}.{name}; a CIFAR-100 archive only needs {allowed}"
            )
        return SAFE_GLOBALS[module, name]


def as_text(value) -> str:
    """Python 2 strings come back as bytes with encoding="bytes" and as str with encoding="latin1"."""
    return value.decode("latin1") if isinstance(value, bytes) else value


def read_archive(path: Path, encoding: str = "bytes", progress: bool = False) -> Cifar100:
    """The meta, train and test members of a CIFAR-100 archive, read from the tar without extracting.

    `encoding` is the pickle encoding for the Python 2 strings: "bytes" or "latin1"; both give the same.
    """
    wanted = {f"{MEMBER_DIR}/{name}": name for name in ("meta", "train", "test")}
    pickled = {}
    try:
        with (
            tqdm.wrapattr(
                open(path, "rb"), "read", total=path.stat().st_size, desc=f"read {path.name}", disable=not progress
            ) as file,
            tarfile.open(fileobj=file, mode="r|*") as tar,
        ):
            for member in tar:
                check_member_path(member.name)
                if member.name not in wanted:
                    continue
                if not member.isfile() or wanted[member.name] in pickled:
                    raise UnsafeArchive(f"archive member {member.name} is not a single regular file")
                unpickler = RestrictedUnpickler(tar.extractfile(member), member.name, encoding)
                pickled[wanted[member.name]] = {as_text(key): value for key, value in unpickler.load().items()}
    except EtlError:
        raise
    except Exception as error:  # whatever else fails while decoding untrusted bytes means they are not CIFAR-100
        raise CorruptArchive(
            f"{path.name} is not a readable CIFAR-100 archive: {type(error).__name__}: {error}"
        ) from None
    missing = [name for name in wanted if wanted[name] not in pickled]
    if missing:
        raise CorruptArchive(f"{path.name} is not a CIFAR-100 archive: it has no {', '.join(missing)}")
    try:
        names = [as_text(name) for name in pickled["meta"]["fine_label_names"]]
    except (KeyError, TypeError):
        raise CorruptArchive(f"{path.name}: {MEMBER_DIR}/meta has no list of fine_label_names") from None
    return Cifar100(names, split_of(pickled["train"], path, "train"), split_of(pickled["test"], path, "test"))


def check_member_path(name: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise UnsafeArchive(f"archive member with an unsafe path: {name!r}")


def split_of(pickled: dict, path: Path, member: str) -> Split:
    try:
        filenames = [as_text(name) for name in pickled["filenames"]]
        fine_labels = np.asarray(pickled["fine_labels"], dtype=np.int64)
        data = pickled["data"]
    except (KeyError, TypeError, ValueError):
        raise CorruptArchive(f"{path.name}: {MEMBER_DIR}/{member} lacks filenames, fine_labels or data") from None
    count = len(filenames)
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.shape == (count, 3 * IMAGE_SIDE**2)
        and fine_labels.shape == (count,)
    ):
        raise CorruptArchive(f"{path.name}: {MEMBER_DIR}/{member} does not hold {count} rows of 3072 bytes")
    return Split(filenames, fine_labels, data)
