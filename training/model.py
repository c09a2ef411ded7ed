"""The network: a ResNet-9-style convnet on 32x32 RGB images, and the mirror-averaged form it is served in.

Shipped in the model's `code/` beside `inference.py`, which builds it from `model.json` with `from_settings`.
"""

import torch
from torch import nn

IMAGE_SIZE = 32
# As in Page's ResNet-9: max-pooled features are large, and unscaled logits make the first epochs unstable.
LOGIT_SCALE = 0.125


def conv_bn(channels_in: int, channels_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class Classifier(nn.Module):
    """A ResNet-9-style convnet taking RGB images scaled to 0..1; it normalises them itself."""

    def __init__(self, num_outputs: int, width: int, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.features = nn.Sequential(
            conv_bn(3, width),
            conv_bn(width, 2 * width, pool=True),
            Residual(2 * width),
            conv_bn(2 * width, 4 * width, pool=True),
            conv_bn(4 * width, 8 * width, pool=True),
            Residual(8 * width),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8 * width, num_outputs)

    def forward(self, images):
        return self.head(self.features((images - self.mean) / self.std)) * LOGIT_SCALE

    def architecture(self) -> dict:
        """What `from_settings` needs to build this network again, as written to model.json."""
        return {"name": "resnet9", "width": self.head.in_features // 8, "num_outputs": self.head.out_features}


def from_settings(settings: dict) -> Classifier:
    """The untrained network that model.json's `architecture`, `mean` and `std` describe."""
    architecture = settings["architecture"]
    return Classifier(architecture["num_outputs"], architecture["width"], settings["mean"], settings["std"])


class MirrorAveraged(nn.Module):
    """The model's logits averaged with those of the mirror images, the two passes run in parallel once traced
    (torch.jit.fork runs the second on one of PyTorch's inter-op threads)."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, images):
        mirrored = torch.jit.fork(self.model, images.flip(3).contiguous(memory_format=torch.channels_last))
        return (self.model(images) + torch.jit.wait(mirrored)) / 2


def target_logits(model: Classifier, images: torch.Tensor, num_classes: int, flip_tta: bool) -> torch.Tensor:
    """Logits of the target classes in float32, averaged with the mirrored image's when `flip_tta`, as served."""
    served = MirrorAveraged(model) if flip_tta else model
    return served(images.contiguous(memory_format=torch.channels_last))[:, :num_classes].float()
