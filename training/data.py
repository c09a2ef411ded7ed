"""The staged data as the training container finds it: SageMaker's channels, `.lst` manifests and images.

Script-mode conventions: each channel is a folder, `SM_CHANNEL_<NAME>` or `/opt/ml/input/data/<name>`.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

if __package__:  # imported from this repository as training.data
    from .inference import to_pixels
    from .model import IMAGE_SIZE
else:  # run from the source directory, as SageMaker runs train.py
    from inference import to_pixels
    from model import IMAGE_SIZE


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def channel(name: str, required: bool = True) -> Path | None:
    variable = f"SM_CHANNEL_{name.upper()}"
    directory = Path(os.environ.get(variable, f"/opt/ml/input/data/{name}"))
    if directory.is_dir():
        return directory
    if required:
        raise SystemExit(f"train.py: error: channel {name!r} not found at {directory} (set {variable})")
    return None


def read_manifest(path: Path) -> list[tuple[int, str]]:
    """(label, relative image path) rows of a SageMaker `.lst` manifest: `index<TAB>label<TAB>path`."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise SystemExit(f"train.py: error: {path} is not a text manifest") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            fields = line.split("\t")
            if len(fields) < 3:
                raise SystemExit(f"train.py: error: {path}:{number}: not `index<TAB>label<TAB>path`")
            try:
                label = int(float(fields[1]))
            except ValueError:
                label = -1
            if label < 0:
                raise SystemExit(f"train.py: error: {path}:{number}: label {fields[1]!r} is not a number 0 or above")
            rows.append((label, fields[-1]))
    return rows


def image_path(image_dir: Path, relative: str, manifest: Path) -> Path:
    path = image_dir / relative
    if not path.is_file():  # SageMaker may drop the `train/` of `train/x.png` when it downloads a channel
        path = image_dir / Path(relative).name
    if not path.is_file():
        raise SystemExit(f"train.py: error: {relative} (listed in {manifest}) is not in {image_dir}")
    return path


def load_split(image_dir: Path, manifest: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decoded uint8 images (N, 3, 32, 32), their labels and manifest paths."""
    rows = read_manifest(manifest)
    images = np.empty((len(rows), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for index, (_, relative) in enumerate(rows):
        path = image_path(image_dir, relative, manifest)
        try:
            with Image.open(path) as image:
                images[index] = to_pixels(image)
        except (OSError, SyntaxError, ValueError) as error:
            raise SystemExit(
                f"train.py: error: {path} (listed in {manifest}) is not a readable image: {error}"
            ) from None
    return images, np.array([label for label, _ in rows], dtype=np.int64), [relative for _, relative in rows]


def subset(split, num_classes: int, targets: bool = True):
    """The rows of a split whose labels are (or, with `targets=False`, are not) below `num_classes`."""
    keep = (split[1] < num_classes) == targets
    return split[0][keep], split[1][keep], [path for path, kept in zip(split[2], keep, strict=True) if kept]


def concatenate(split, other):
    return np.concatenate([split[0], other[0]]), np.concatenate([split[1], other[1]]), split[2] + other[2]


def class_names(num_classes: int, search_dirs) -> list[str]:
    """Target class names in label order, from a dataset.json beside the data if there is one."""
    for directory in search_dirs:
        path = directory / "dataset.json"
        if path.is_file():
            try:
                classes = json.loads(path.read_text()).get("classes")
            except (ValueError, AttributeError):
                raise SystemExit(
                    f"train.py: error: {path} is not the JSON object `python -m training.etl` writes"
                ) from None
            if classes:
                named = [
                    (entry["label"], entry["name"]) if isinstance(entry, dict) else (index, entry)
                    for index, entry in enumerate(classes)
                ]
                return [name for _, name in sorted(named)][:num_classes]
    return [str(label) for label in range(num_classes)]


def load_data(num_classes: int) -> tuple[dict, list[str]]:
    """The train, validation and (if its channels are there) test splits, and the target class names.

    Only target labels are validated and tested; the validation images of other labels join the training set.
    """
    image_dir, train_lst = channel("train"), channel("train_lst")
    validation_dir, validation_lst = channel("validation"), channel("validation_lst")
    test_dir, test_lst = channel("test", required=False), channel("test_lst", required=False)
    validation = load_split(validation_dir, validation_lst / "validation.lst")
    data = {
        "train": concatenate(load_split(image_dir, train_lst / "train.lst"), subset(validation, num_classes, False)),
        "validation": subset(validation, num_classes),
    }
    if test_dir and test_lst and (test_lst / "test.lst").is_file():
        test = subset(load_split(test_dir, test_lst / "test.lst"), num_classes)
        if len(test[1]):
            data["test"] = test
        else:
            log(f"{test_lst / 'test.lst'} lists no images of the target classes: no test metrics")
    missing = sorted(set(range(num_classes)) - set(data["train"][1].tolist()) - set(data["validation"][1].tolist()))
    if missing:
        raise SystemExit(f"train.py: error: no training or validation images of target labels {missing}")
    if not len(data["validation"][1]):
        raise SystemExit(
            f"train.py: error: {validation_lst / 'validation.lst'} lists no images of the target "
            f"classes, on which the temperature and threshold are fitted"
        )
    return data, class_names(num_classes, [train_lst, image_dir, validation_lst])
