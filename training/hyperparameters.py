"""train.py's hyperparameters: names, types, ranges and defaults, as SageMaker passes them (`--name value`)."""

import argparse

if __package__:  # imported from this repository as training.hyperparameters
    from .model import IMAGE_SIZE
else:  # run from the source directory, as SageMaker runs train.py
    from model import IMAGE_SIZE

ARCHITECTURES = ("resnet9", "efficientnet_lite0")
# The hyperparameters whose default is "auto", by the precision training runs in: bfloat16 on a CPU with
# AVX512-BF16 computes this model about 3 times faster than float32 on AVX2, and the recipe uses that time
# (measured on 2 cores: 168 s in float32 on AVX2, 149 s in bfloat16 on AVX512-BF16; the goal is 3 minutes).
AUTO = {"float32": {"epochs": 42, "extra_fraction": 0.25}, "bfloat16": {"epochs": 85, "extra_fraction": 0.5}}


class HyperparameterError(ValueError):
    """A hyperparameter is unknown or out of range; the message names it."""


class HyperparameterParser(argparse.ArgumentParser):
    """An argument parser that raises HyperparameterError instead of printing usage and exiting."""

    def error(self, message):
        raise HyperparameterError(message)


def _bounded(kind, low, high, auto: bool = False):
    def parse(text):
        if auto and text == "auto":
            return text
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a{'n' if kind is int else ''} {kind.__name__}"
                f"{' or auto' if auto else ''}; valid range [{low}, {high}]"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside the valid range [{low}, {high}]")
        return value

    return parse


def _one_of(choices):
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


# name: (type, default, low, high, help), or for a choice (str, default, choices, None, help);
# SageMaker passes each as `--name value`.
HYPERPARAMETERS = {
    "epochs": (int, "auto", 1, 1000, "resnet9: passes over the target classes' training images"),
    "batch_size": (int, 128, 1, 4096, "resnet9: images per step"),
    "learning_rate": (float, 0.2, 1e-6, 10.0, "resnet9: peak of the one-cycle learning rate (SGD, Nesterov momentum)"),
    "weight_decay": (float, 5e-4, 0.0, 1.0, "resnet9: L2 penalty on convolution and linear weights"),
    "label_smoothing": (float, 0.0, 0.0, 0.5, "resnet9: label smoothing of the cross-entropy loss"),
    "width": (int, 16, 4, 256, "resnet9: channels of the first layer; deeper layers have 2x, 4x, 8x"),
    "cutout": (int, 8, 0, IMAGE_SIZE, "resnet9: side of the square erased from each training image (0: none)"),
    "flip_tta": (int, 1, 0, 1, "resnet9: 1: average the predictions of each image and its mirror image"),
    "bfloat16": (
        str,
        "auto",
        ("auto", "1", "0"),
        None,
        "resnet9: 1: train in bfloat16 autocast; auto: where the GPU or CPU computes bfloat16 natively "
        "(a CPU without AVX512-BF16 or AMX emulates it, over 10x slower than float32)",
    ),
    "weight_average": (
        float,
        0.99,
        0.0,
        0.9999,
        "resnet9: decay of the moving average of the weights kept as the model, updated each step (0: last weights)",
    ),
    "target_weight": (
        float,
        3.0,
        0.1,
        100.0,
        "resnet9: loss weight of the target classes relative to the others learnt alongside",
    ),
    "extra_fraction": (
        float,
        "auto",
        0.0,
        1.0,
        "resnet9: share of the other classes' training images drawn afresh for each epoch",
    ),
    "architecture": (
        str,
        "efficientnet_lite0",
        ARCHITECTURES,
        None,
        "efficientnet_lite0 (the photo recipe, training/backbone.py): frozen ImageNet features and a linear head "
        "that also answers neither; resnet9: the 32x32 convnet trained from scratch, serving the targets only",
    ),
    "image_size": (int, 128, 32, 320, "efficientnet_lite0: side of the square the photo is resized to"),
    "resize": (
        str,
        "crop",
        ("crop", "pad"),
        None,
        "efficientnet_lite0: a photo's largest centred square, or all of it padded",
    ),
    "neither_per_class": (int, 50, 1, 100000, "efficientnet_lite0: images of each non-target label learnt as neither"),
    "head_steps": (int, 200, 1, 100000, "efficientnet_lite0: Adam steps of 512 images fitting the linear head"),
    "head_learning_rate": (float, 1e-3, 1e-6, 1.0, "efficientnet_lite0: Adam's learning rate for the head"),
    "head_weight_decay": (float, 1e-3, 0.0, 1.0, "efficientnet_lite0: L2 penalty on the head's weights"),
    "target_classes": (
        int,
        2,
        2,
        100,
        "labels 0..N-1 are the classes served; further labels are learnt as neither (resnet9: alongside)",
    ),
    "target_accuracy": (
        float,
        0.99,
        0.5,
        1.0,
        "accuracy wanted on accepted answers of the targets; sets the threshold",
    ),
    "max_neither_accepted": (
        float,
        0.01,
        0.0,
        1.0,
        "efficientnet_lite0: share of the neither images the threshold may accept; with target_accuracy, sets it",
    ),
    "seed": (int, 0, 0, 2**31 - 1, "seed of initialisation, shuffling and augmentation"),
}


def add_hyperparameters(parser) -> None:
    for name, (kind, default, low, high, help_text) in HYPERPARAMETERS.items():
        if kind is str:
            parser.add_argument(
                f"--{name}",
                type=_one_of(low),
                default=default,
                metavar="|".join(low),
                help=f"{help_text} (default {default})",
            )
        else:
            auto = default == "auto"
            if auto:
                help_text += (
                    f"; auto: {AUTO['bfloat16'][name]} where training runs in bfloat16, "
                    f"{AUTO['float32'][name]} in float32"
                )
            parser.add_argument(
                f"--{name}",
                type=_bounded(kind, low, high, auto),
                default=default,
                metavar=kind.__name__.upper(),
                help=f"{help_text} (default {default}, range [{low}, {high}])",
            )


def parse_hyperparameters(argv) -> argparse.Namespace:
    parser = HyperparameterParser(prog="train.py")
    add_hyperparameters(parser)
    return parser.parse_args(argv)
