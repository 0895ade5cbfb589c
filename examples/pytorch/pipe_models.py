"""pipe's generators and discriminators as plain PyTorch modules.

Each class mirrors one architecture of pipe (stages/src/train/models.rs) layer for layer: the
same layers in the same order, the same activations, and the same variable names, so the
weights that `pipe export` writes load with ``model.load_state_dict(state, strict=True)``.

Shapes and ranges (all tensors float32, images NCHW):

- a generator maps latents ``z`` of shape ``[N, latent]`` (drawn from N(0, I), as in training)
  to images ``[N, C, H, W]`` in [-1, 1] (tanh output); pixels are
  ``((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)``, channels grey (C = 1) or RGB;
- a discriminator maps images ``[N, C, H, W]`` in [-1, 1] to one logit per image, ``[N, 1]``
  (no sigmoid).

Batch norm uses PyTorch's defaults (eps 1e-5, momentum 0.1), as pipe does. Call ``.eval()``
before generating: batch norm then uses the running statistics, as pipe's sample grids,
``pipe sample`` and the exported ``generator.pt`` do. pipe does not count batch-norm updates,
so an exported ``num_batches_tracked`` is 0 (PyTorch reads it only when momentum is None).

The constructor arguments of an exported file are in its safetensors metadata (``class`` and
``kwargs``, a JSON object); :func:`load_generator` and :func:`load_discriminator` build the
module from them and load the weights strictly.

Requires torch and safetensors (``pip install torch safetensors``).
"""

import json

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MlpGenerator",
    "DcganGenerator",
    "InfoGanGenerator",
    "MlpDiscriminator",
    "DcganDiscriminator",
    "InfoGanDiscriminator",
    "load_generator",
    "load_discriminator",
    "load",
]

# Leaky ReLU slope of every discriminator.
SLOPE = 0.2


def dcgan_depth(size):
    """Number k of stride-2 stages of a DCGAN for images of side ``size`` = 4·2^k, k ≥ 1."""
    k = 0
    while 4 << (k + 1) <= size:
        k += 1
    if size < 8 or 4 << k != size:
        raise ValueError(f"a DCGAN needs square images of size 4·2^k with k ≥ 1 (8, 16, 32, ...), got {size}")
    return k


def _check_infogan(height, width):
    if height % 4 or width % 4 or height == 0 or width == 0:
        raise ValueError(f"InfoGan needs a height and width that are multiples of 4, got {height}×{width}")


class MlpGenerator(nn.Module):
    """pipe's ``Mlp(hidden, layers, batch_norm)`` generator.

    ``layers`` times: linear (``fc{i}``) → batch norm 1-d (``bn{i}``, when ``batch_norm``) →
    ReLU; then linear to C·H·W values (``out``) → tanh → reshape to ``[N, C, H, W]``.

    Args:
        latent: size of z.
        image_shape: ``(C, H, W)`` of the images.
        hidden: units per hidden layer.
        layers: number of hidden layers (0 or more).
        batch_norm: batch norm after each hidden linear layer.

    Input ``[N, latent]``; output ``[N, C, H, W]`` in [-1, 1].
    """

    def __init__(self, latent, image_shape, hidden=1024, layers=2, batch_norm=False):
        super().__init__()
        self.latent, self.image_shape = latent, tuple(image_shape)
        self.layers, self.batch_norm = layers, batch_norm
        c, h, w = self.image_shape
        inp = latent
        for i in range(layers):
            self.add_module(f"fc{i}", nn.Linear(inp, hidden))
            if batch_norm:
                self.add_module(f"bn{i}", nn.BatchNorm1d(hidden))
            inp = hidden
        self.out = nn.Linear(inp, c * h * w)

    def forward(self, z):
        x = z
        for i in range(self.layers):
            x = getattr(self, f"fc{i}")(x)
            if self.batch_norm:
                x = getattr(self, f"bn{i}")(x)
            x = F.relu(x)
        return torch.tanh(self.out(x)).view(-1, *self.image_shape)


class DcganGenerator(nn.Module):
    """pipe's ``Dcgan(width, batch_norm)`` generator (Radford et al. 2016), for square images of
    side 4·2^k, k ≥ 1.

    z viewed as ``[N, latent, 1, 1]`` → transposed conv 4×4 (``up0``, stride 1, no bias) to a
    4×4 map of ``width·2^(k-1)`` channels → batch norm (``bn0``) → ReLU; then k − 1 times:
    transposed conv 4×4 stride 2 padding 1 (``up{i}``, no bias) halving the channels and
    doubling the side → batch norm (``bn{i}``) → ReLU; then the same transposed conv to C
    channels (``up{k}``) → tanh.

    Args:
        latent: size of z.
        image_shape: ``(C, S, S)``, S = 8, 16, 32, 64, ...
        width: channels of the last hidden layer (ngf).
        batch_norm: batch norm after each hidden transposed conv (pipe's default: on).

    Input ``[N, latent]``; output ``[N, C, S, S]`` in [-1, 1].
    """

    def __init__(self, latent, image_shape, width=64, batch_norm=True):
        super().__init__()
        self.latent, self.image_shape, self.batch_norm = latent, tuple(image_shape), batch_norm
        c, h, w = self.image_shape
        if h != w:
            raise ValueError(f"a DCGAN needs square images, got {h}×{w}")
        self.depth = k = dcgan_depth(h)
        ch = width << (k - 1)
        self.up0 = nn.ConvTranspose2d(latent, ch, 4, stride=1, padding=0, bias=False)
        if batch_norm:
            self.bn0 = nn.BatchNorm2d(ch)
        for i in range(1, k):
            self.add_module(f"up{i}", nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1, bias=False))
            if batch_norm:
                self.add_module(f"bn{i}", nn.BatchNorm2d(ch // 2))
            ch //= 2
        self.add_module(f"up{k}", nn.ConvTranspose2d(ch, c, 4, stride=2, padding=1, bias=False))

    def forward(self, z):
        x = z.view(-1, self.latent, 1, 1)
        for i in range(self.depth):
            x = getattr(self, f"up{i}")(x)
            if self.batch_norm:
                x = getattr(self, f"bn{i}")(x)
            x = F.relu(x)
        return torch.tanh(getattr(self, f"up{self.depth}")(x))


class InfoGanGenerator(nn.Module):
    """pipe's ``InfoGan(width, hidden)`` generator (Lucic et al. 2018's MNIST networks, after
    InfoGAN), for H and W multiples of 4.

    linear to ``hidden`` (``fc0``) → batch norm 1-d (``bn0``) → ReLU → linear to
    2·width·(H/4)·(W/4) (``fc1``) → batch norm 1-d (``bn1``) → ReLU → reshape
    ``[N, 2·width, H/4, W/4]`` → transposed conv 4×4 stride 2 padding 1 to ``width`` (``up0``)
    → batch norm 2-d (``bn2``) → ReLU → transposed conv 4×4 stride 2 padding 1 to C (``up1``)
    → tanh.

    Args:
        latent: size of z.
        image_shape: ``(C, H, W)``, H and W multiples of 4.
        width: channels of the full-resolution transposed conv (the other has twice as many).
        hidden: units of the fully connected hidden layer.

    Input ``[N, latent]``; output ``[N, C, H, W]`` in [-1, 1].
    """

    def __init__(self, latent, image_shape, width=64, hidden=1024):
        super().__init__()
        self.latent, self.image_shape, self.width = latent, tuple(image_shape), width
        c, h, w = self.image_shape
        _check_infogan(h, w)
        flat = 2 * width * (h // 4) * (w // 4)
        self.fc0 = nn.Linear(latent, hidden)
        self.bn0 = nn.BatchNorm1d(hidden)
        self.fc1 = nn.Linear(hidden, flat)
        self.bn1 = nn.BatchNorm1d(flat)
        self.up0 = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.up1 = nn.ConvTranspose2d(width, c, 4, stride=2, padding=1)

    def forward(self, z):
        _, h, w = self.image_shape
        x = F.relu(self.bn0(self.fc0(z)))
        x = F.relu(self.bn1(self.fc1(x)))
        x = x.view(-1, 2 * self.width, h // 4, w // 4)
        x = F.relu(self.bn2(self.up0(x)))
        return torch.tanh(self.up1(x))


class MlpDiscriminator(nn.Module):
    """pipe's ``Mlp(hidden, layers, batch_norm)`` discriminator.

    Flatten → ``layers`` times: linear (``fc{i}``) → batch norm 1-d (``bn{i}``, when
    ``batch_norm``) → leaky ReLU (0.2); then linear to one logit (``out``).

    Args:
        image_shape: ``(C, H, W)`` of the images.
        hidden: units per hidden layer.
        layers: number of hidden layers (0 or more).
        batch_norm: batch norm after each hidden linear layer.

    Input ``[N, C, H, W]`` in [-1, 1]; output ``[N, 1]`` logits.
    """

    def __init__(self, image_shape, hidden=1024, layers=2, batch_norm=False):
        super().__init__()
        self.image_shape, self.layers, self.batch_norm = tuple(image_shape), layers, batch_norm
        c, h, w = self.image_shape
        inp = c * h * w
        for i in range(layers):
            self.add_module(f"fc{i}", nn.Linear(inp, hidden))
            if batch_norm:
                self.add_module(f"bn{i}", nn.BatchNorm1d(hidden))
            inp = hidden
        self.out = nn.Linear(inp, 1)

    def forward(self, x):
        x = x.flatten(1)
        for i in range(self.layers):
            x = getattr(self, f"fc{i}")(x)
            if self.batch_norm:
                x = getattr(self, f"bn{i}")(x)
            x = F.leaky_relu(x, SLOPE)
        return self.out(x)


class DcganDiscriminator(nn.Module):
    """pipe's ``Dcgan(width, batch_norm)`` discriminator, for square images of side 4·2^k.

    k times: conv 4×4 stride 2 padding 1 (``conv{i}``) doubling the channels from ``width``
    and halving the side → batch norm 2-d (``bn{i}``, not after the first, when
    ``batch_norm``) → leaky ReLU (0.2); then a 4×4 conv on the 4×4 map to one logit (``out``)
    → flatten.

    Args:
        image_shape: ``(C, S, S)``, S = 8, 16, 32, 64, ...
        width: channels of the first conv (ndf).
        batch_norm: batch norm after each conv but the first (pipe's default: off).

    Input ``[N, C, S, S]`` in [-1, 1]; output ``[N, 1]`` logits.
    """

    def __init__(self, image_shape, width=64, batch_norm=False):
        super().__init__()
        self.image_shape, self.batch_norm = tuple(image_shape), batch_norm
        c, h, w = self.image_shape
        if h != w:
            raise ValueError(f"a DCGAN needs square images, got {h}×{w}")
        self.depth = k = dcgan_depth(h)
        inp, ch = c, width
        for i in range(k):
            self.add_module(f"conv{i}", nn.Conv2d(inp, ch, 4, stride=2, padding=1))
            if i > 0 and batch_norm:
                self.add_module(f"bn{i}", nn.BatchNorm2d(ch))
            inp, ch = ch, ch * 2
        self.out = nn.Conv2d(inp, 1, 4)

    def forward(self, x):
        for i in range(self.depth):
            x = getattr(self, f"conv{i}")(x)
            if i > 0 and self.batch_norm:
                x = getattr(self, f"bn{i}")(x)
            x = F.leaky_relu(x, SLOPE)
        return self.out(x).flatten(1)


class InfoGanDiscriminator(nn.Module):
    """pipe's ``InfoGan(width, hidden)`` discriminator, for H and W multiples of 4.

    conv 4×4 stride 2 padding 1 to ``width`` (``conv0``) → leaky ReLU (0.2) → the same conv to
    2·width (``conv1``) → leaky ReLU → flatten → linear to ``hidden`` (``fc0``) → leaky ReLU →
    linear to one logit (``out``). No batch norm.

    Args:
        image_shape: ``(C, H, W)``, H and W multiples of 4.
        width: channels of the first conv (the second has twice as many).
        hidden: units of the fully connected hidden layer.

    Input ``[N, C, H, W]`` in [-1, 1]; output ``[N, 1]`` logits.
    """

    def __init__(self, image_shape, width=64, hidden=1024):
        super().__init__()
        self.image_shape = tuple(image_shape)
        c, h, w = self.image_shape
        _check_infogan(h, w)
        self.conv0 = nn.Conv2d(c, width, 4, stride=2, padding=1)
        self.conv1 = nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)
        self.fc0 = nn.Linear(2 * width * (h // 4) * (w // 4), hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        x = F.leaky_relu(self.conv0(x), SLOPE)
        x = F.leaky_relu(self.conv1(x), SLOPE)
        x = F.leaky_relu(self.fc0(x.flatten(1)), SLOPE)
        return self.out(x)


CLASSES = {
    cls.__name__: cls
    for cls in (
        MlpGenerator,
        DcganGenerator,
        InfoGanGenerator,
        MlpDiscriminator,
        DcganDiscriminator,
        InfoGanDiscriminator,
    )
}


def load(path, device="cpu"):
    """Build the module a ``pipe export`` safetensors file describes and load its weights.

    The file's metadata names the class (``class``) and its constructor arguments (``kwargs``,
    JSON); the weights load with ``strict=True``. Returns ``(module, metadata)``, the module
    in eval mode on ``device``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "pipe-export" or meta.get("class") not in CLASSES:
        raise ValueError(f"{path}: not a model file written by `pipe export` (no known `class` in its metadata)")
    model = CLASSES[meta["class"]](**json.loads(meta["kwargs"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval(), meta


def load_generator(path, device="cpu"):
    """The generator in ``generator.safetensors`` (written by ``pipe export``), in eval mode.

    ``load_generator(path)(z)`` with ``z`` of shape ``[N, latent]`` gives images
    ``[N, C, H, W]`` in [-1, 1].
    """
    model, meta = load(path, device)
    if meta.get("role") != "generator":
        raise ValueError(f"{path}: holds a {meta.get('role')}, not a generator")
    return model


def load_discriminator(path, device="cpu"):
    """The discriminator in ``discriminator.safetensors`` (written by ``pipe export``), in eval
    mode: images ``[N, C, H, W]`` in [-1, 1] → logits ``[N, 1]``."""
    model, meta = load(path, device)
    if meta.get("role") != "discriminator":
        raise ValueError(f"{path}: holds a {meta.get('role')}, not a discriminator")
    return model
