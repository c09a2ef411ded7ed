"""The staged data as the training container finds it: SageMaker's channels, `.lst` manifests and images.

Script-mode conventions: each channel is a folder, `SM_CHANNEL_<NAME>` or `/opt/ml/input/data/<name>`.
The optional `labels` channel holds reviewed photos as `<class>/<photo>` (the training stack points it at
`s3://<bucket>/labels/`, where the review page writes them): they are checked and split as
`python -m training.etl --photos` stages them, and join the staged images.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

if __package__:  # imported from this repository as training.data
    from . import photos
    from .inference import to_pixels
    from .model import IMAGE_SIZE
else:  # run from the source directory, as SageMaker runs train.py
    import photos
    from inference import to_pixels
    from model import IMAGE_SIZE

LABELS_CHANNEL = "labels"


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
    return decode([(label, image_path(image_dir, relative, manifest), relative) for label, relative in rows], manifest)


def decode(rows: list[tuple[int, Path, str]], listed_in: Path | str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The images of (label, path, name) rows, decoded as in `load_split`."""
    images = np.empty((len(rows), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for index, (_, path, _) in enumerate(rows):
        try:
            with Image.open(path) as image:
                images[index] = to_pixels(image)
        except (OSError, SyntaxError, ValueError) as error:
            raise SystemExit(
                f"train.py: error: {path} (listed in {listed_in}) is not a readable image: {error}"
            ) from None
    return images, np.array([label for label, _, _ in rows], dtype=np.int64), [name for _, _, name in rows]


def subset(split, num_classes: int, targets: bool = True):
    """The rows of a split whose labels are (or, with `targets=False`, are not) below `num_classes`."""
    keep = (split[1] < num_classes) == targets
    return split[0][keep], split[1][keep], [path for path, kept in zip(split[2], keep, strict=True) if kept]


def concatenate(split, other):
    return np.concatenate([split[0], other[0]]), np.concatenate([split[1], other[1]]), split[2] + other[2]


def dataset_json(search_dirs) -> dict | None:
    """The dataset.json `python -m training.etl` writes beside the data, if there is one."""
    for directory in search_dirs:
        path = directory / "dataset.json"
        if path.is_file():
            try:
                dataset = json.loads(path.read_text())
            except ValueError:
                dataset = None
            if not isinstance(dataset, dict):
                raise SystemExit(f"train.py: error: {path} is not the JSON object `python -m training.etl` writes")
            return dataset
    return None


def class_names(num_classes: int, search_dirs) -> list[str]:
    """Target class names in label order, from a dataset.json beside the data if there is one."""
    classes = (dataset_json(search_dirs) or {}).get("classes")
    if classes:
        named = [
            (entry["label"], entry["name"]) if isinstance(entry, dict) else (index, entry)
            for index, entry in enumerate(classes)
        ]
        return [name for _, name in sorted(named)][:num_classes]
    return [str(label) for label in range(num_classes)]


def labelled_photos(staging: Path, staged: set[str]) -> tuple[dict[str, list[tuple[int, Path, str]]], dict] | None:
    """The photos of the `labels` channel, checked, deduplicated and split into train and validation as
    `python -m training.etl --photos` stages them (copied into `staging`), as (label, path, name) rows per
    split, and the summary dataset.json's `photos` section holds. None without the channel or a photo in it.
    Photos the manifests list already (`staged`, their names; staged with `--photos`) are not taken twice.

    Labels are dataset.json's; "neither" takes the label after every other class when the staged data has none."""
    directory = channel(LABELS_CHANNEL, required=False)
    if directory is None:
        return None
    dataset = dataset_json([channel("train_lst"), channel("train")])
    if dataset is None:
        raise SystemExit(
            "train.py: error: the labels channel needs the dataset.json that `python -m training.etl` writes "
            "beside train.lst, which says each class's label"
        )
    labels = {
        **{entry["name"]: entry["label"] for entry in dataset.get("classes", []) if isinstance(entry, dict)},
        **{entry: index for index, entry in enumerate(dataset.get("classes", [])) if isinstance(entry, str)},
        **{entry["name"]: entry["label"] for entry in dataset.get("extra_classes", [])},
    }
    labels.setdefault(photos.NEITHER, max(labels.values(), default=-1) + 1)
    try:
        source = photos.find(directory)
    except photos.PhotoError:
        log(f"no reviewed photos in the {LABELS_CHANNEL} channel")
        return None
    (staging / photos.STAGED_PREFIX).parent.mkdir(parents=True, exist_ok=True)
    split = dataset.get("validation", {})
    checked = photos.stage(
        source,
        staging,
        [name for name in labels if name != photos.NEITHER],
        validation_fraction=split.get("fraction", 0.0),
        seed=split.get("seed", 0),
        progress=False,
    )
    rows = {
        split_name: [(labels[name], staging / path, path) for name, path in split_rows if path not in staged]
        for split_name, split_rows in checked.rows.items()
    }
    already = sum(len(split_rows) for split_rows in checked.rows.values()) - sum(map(len, rows.values()))
    log(
        f"reviewed photos from the {LABELS_CHANNEL} channel: {len(rows['train'])} for training, "
        f"{len(rows['validation'])} for validation, {already} staged already, {len(checked.section['skipped'])} "
        "skipped"
    )
    for skipped in checked.section["skipped"]:
        log(f"skipped reviewed photo {skipped['path']}: {skipped['reason']}")
    return rows, {**checked.section, "source": LABELS_CHANNEL, "staged_already": already}


def load_data(num_classes: int) -> tuple[dict, list[str]]:
    """The train, validation and (if its channels are there) test splits, and the target class names.

    Only target labels are validated and tested; the validation images of other labels join the training set.
    """
    image_dir, train_lst = channel("train"), channel("train_lst")
    validation_dir, validation_lst = channel("validation"), channel("validation_lst")
    test_dir, test_lst = channel("test", required=False), channel("test_lst", required=False)
    train = load_split(image_dir, train_lst / "train.lst")
    validation = load_split(validation_dir, validation_lst / "validation.lst")
    with tempfile.TemporaryDirectory() as staging:
        reviewed = labelled_photos(Path(staging), {*train[2], *validation[2]})
        if reviewed:
            rows, section = reviewed
            train = concatenate(train, decode(rows["train"], LABELS_CHANNEL))
            validation = concatenate(validation, decode(rows["validation"], LABELS_CHANNEL))
    data = {
        "train": concatenate(train, subset(validation, num_classes, False)),
        "validation": subset(validation, num_classes),
    }
    if reviewed:
        data["labels"] = section
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
