"""The SageMaker source directory: the files the training container runs, and nothing else.

`python -m training.fit --local` runs the training script from a copy of exactly these files, as the container
does, so a file missing from the list fails a local fit too. `pack` writes them as SageMaker's
`sourcedir.tar.gz` for the training stack to ship; the container extracts it into its code folder when
`sagemaker_submit_directory` names the archive, and runs `sagemaker_program` (`train.py`) from there.

Before that, the container's training toolkit runs `pip install -r requirements.txt` in the extracted folder when
the file is there (sagemaker-training-toolkit, `entry_point.install`): `requirements.txt` here is how a package the
container lacks reaches the job. The serving container does the same with the model's `code/requirements.txt`
when its model server starts (sagemaker-pytorch-inference-toolkit, `torchserve.start_torchserve`); the model
carries none today (`train.SERVING_CODE`). What each container provides is below; `tests/test_sourcedir.py`
fails when a shipped file imports anything else.
"""

import gzip
import io
import shutil
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENTRY_POINT = "train.py"
# requirements.txt: what the container pip-installs before the entry point runs (the backbone's two packages)
FILES = (
    ENTRY_POINT,
    "hyperparameters.py",
    "data.py",
    "photos.py",
    "model.py",
    "inference.py",
    "calibration.py",
    "backbone.py",
    "requirements.txt",
)

# The containers' Python, and the standard library modules that this machine's Python (3.11, whose
# sys.stdlib_module_names the check uses) knows but 3.12 removed (PEP 594 and PEP 632).
CONTAINER_PYTHON = "3.12"
REMOVED_FROM_STDLIB = frozenset({"asynchat", "asyncore", "distutils", "imp", "smtpd"})

# Importable packages of SageMaker's PyTorch 2.6 CPU images (py312), by import name, from the "sagemaker" stages
# of aws/deep-learning-containers pytorch/training/docker/2.6/py3/Dockerfile.cpu (training) and
# pytorch/inference/docker/2.6/py3/Dockerfile.cpu (inference); the core_packages.json files beside them pin
# torch 2.6.0+cpu and torchvision 0.21.0+cpu. Only what a Dockerfile names (and hard dependencies: botocore under
# boto3, Pillow under torchvision), not what comes along with something else (matplotlib under seaborn in
# training): such a package may be gone in the next build of the image. numpy: training pins "numpy<2" (for
# fastai), so 1.x; inference installs it unpinned. Code must run on both. sagemaker there is the v2 SDK.
_BOTH = {
    "torch", "torchvision", "torchaudio", "torchtext", "torchdata",
    "numpy", "scipy", "PIL", "cv2", "h5py", "boto3", "botocore", "requests", "urllib3", "idna", "charset_normalizer",
    "tqdm", "packaging", "setuptools", "Cython", "cryptography", "OpenSSL", "parso", "IPython", "awscli",
}  # fmt: skip
TRAINING_CONTAINER = frozenset(_BOTH | {
    "yaml", "click", "psutil", "ipykernel", "fsspec", "mpi4py", "pybind11",
    "torchtnt", "s3torchconnector", "fastai", "accelerate", "spacy", "thinc", "blis",
    "smclarify", "sagemaker", "smexperiments", "sagemaker_pytorch_container", "sagemaker_training",
    "bokeh", "imageio", "numba", "pandas", "plotly", "sklearn", "seaborn", "shap", "cloudpickle",
})  # fmt: skip
SERVING_CONTAINER = frozenset(_BOTH | {
    "pytz", "tzdata", "ts", "model_archiver",
    "sklearn", "pandas", "sagemaker_pytorch_serving_container", "sagemaker_inference", "s3transfer",
})  # fmt: skip


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
