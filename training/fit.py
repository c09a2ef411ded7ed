"""Fit the model: `python -m training.fit --local --data DIR --out DIR [hyperparameters]`.

`--local` runs `training/train.py` on this machine exactly as SageMaker's PyTorch container runs it
(hyperparameters as arguments, data through the `SM_CHANNEL_*` variables, all channels pointing at the
staged data folder) and packs the model directory into `OUT/model.tar.gz` the way SageMaker does;
metrics.json and the plots land in OUT.
"""

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from training import train

TRAIN_SCRIPT = Path(train.__file__).resolve()
MANIFESTS = ("train.lst", "validation.lst")


class FitError(ValueError):
    """The data folder or a hyperparameter is unusable; the message says which."""


def fit_local(data_dir, out_dir, **hyperparameters) -> Path:
    """Train on the staged data folder `data_dir`; answers the path of `out_dir/model.tar.gz`."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not data_dir.is_dir():
        raise FitError(f"data folder {data_dir} does not exist (stage it with `python -m training.etl`)")
    missing = [name for name in MANIFESTS if not (data_dir / name).is_file()]
    if missing:
        raise FitError(f"data folder {data_dir} has no {' or '.join(missing)} (stage it with `python -m training.etl`)")
    arguments = [f"--{name}={value}" for name, value in hyperparameters.items()]
    try:
        train.parse_hyperparameters(arguments)
    except train.HyperparameterError as error:
        raise FitError(str(error)) from None

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".model-") as model_dir:
        channels = ["train", "train_lst", "validation", "validation_lst"]
        if (data_dir / "test.lst").is_file():
            channels += ["test", "test_lst"]
        env = {**{name: value for name, value in os.environ.items() if not name.startswith("SM_")},
               "SM_MODEL_DIR": model_dir, "SM_OUTPUT_DATA_DIR": str(out_dir),
               **{f"SM_CHANNEL_{name.upper()}": str(data_dir) for name in channels}}
        finished = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *arguments], env=env)
        if finished.returncode:
            raise RuntimeError(f"train.py failed (exit status {finished.returncode})")
        archive = out_dir / "model.tar.gz"
        partial = out_dir / ".model.tar.gz.partial"
        with tarfile.open(partial, "w:gz") as tar:
            for path in sorted(Path(model_dir).iterdir()):
                tar.add(path, arcname=path.name)
        os.replace(partial, archive)
    return archive


def main(argv=None) -> None:
    parser = train.HyperparameterParser(
        prog="python -m training.fit",
        description="Fit the model: run training/train.py as SageMaker's PyTorch container does, "
                    "then pack OUT/model.tar.gz.")
    parser.add_argument("--local", action="store_true", required=True, help="train on this machine")
    parser.add_argument("--data", type=Path, required=True, metavar="DIR",
                        help="staged data folder (python -m training.etl)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="folder for model.tar.gz, metrics.json and plots")
    train.add_hyperparameters(parser.add_argument_group("hyperparameters, passed on to training/train.py"))
    try:
        args = parser.parse_args(argv)
        given = {name: getattr(args, name) for name in vars(args)
                 if name not in ("local", "data", "out") and getattr(args, name) != parser.get_default(name)}
        archive = fit_local(args.data, args.out, **given)
    except (train.HyperparameterError, FitError) as error:
        print(f"fit: error: {error}", file=sys.stderr)
        raise SystemExit(2)
    except RuntimeError as error:
        print(f"fit: error: {error}", file=sys.stderr)
        raise SystemExit(1)
    print(archive)


if __name__ == "__main__":
    main()
