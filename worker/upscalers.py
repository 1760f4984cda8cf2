"""ESRGAN-family upscalers for the hires fix: the RRDB network of ESRGAN and Real-ESRGAN
(4x-UltraSharp, RealESRGAN_x4plus, R-ESRGAN 4x+ and the many community models trained on it),
read from a .safetensors file in either key layout, run on the worker's device.

Written here rather than loaded with spandrel (the library A1111-likes use): spandrel imports
torchvision when it is imported, and torchvision cannot be installed beside the CPU build of
torch that lorafleet's development and CI machines use (PyPI's torchvision for it fails to
import; the one that imports pulls a multi-GB CUDA torch). The RRDB network is small and
fixed, so lorafleet carries it; common/catalog/upscalers.py reads its shape without torch.

Semantics (ESRGAN, Wang et al. 2018; BasicSR's ``RRDBNet``): with lrelu = LeakyReLU(0.2),

- a residual dense block: x1..x4 = lrelu(conv_k(cat(x, x1, .., x_{k-1}))),
  x5 = conv5(cat(x, x1, .., x4)); out = 0.2 * x5 + x;
- an RRDB: three of them in a row; out = 0.2 * rdb3(rdb2(rdb1(x))) + x;
- the net: f = conv_first(unshuffle(x)); f = f + conv_body(RRDBs(f)); per upsampling conv
  f = lrelu(up(nearest 2x(f))); out = conv_last(lrelu(conv_hr(f))).

Its scale is 2^(upsampling convs) / (the pixel unshuffle of a 2x or 1x Real-ESRGAN model).
Upscaling follows A1111: the model runs until the image reaches the target size (at most
``MAX_PASSES`` times), in tiles of ``TILE`` pixels with ``TILE_PAD`` of context, then Lanczos
brings it to the exact size; each image runs alone, so its pixels never depend on the other
images of its call.
"""

from __future__ import annotations

import logging

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from lorafleet.common.catalog.upscalers import UpscalerInfo, canonical_keys
from lorafleet.common.schema.errors import JobFailed
from lorafleet.worker.lru import LRUCache
from lorafleet.worker.pipelines import PipelineCache, weights_bytes

logger = logging.getLogger(__name__)

KEPT = 2
"""Loaded upscalers a worker keeps (a 4x RRDB model is about 67 MB in float32)."""
MAX_PASSES = 3
"""Most times an image goes through the model to reach its size (A1111's limit too)."""
TILE = 256
"""Input pixels a side of one tile: a 4x model's activations on a 1024 px image whole would
take several GB (A1111 tiles at 192)."""
TILE_PAD = 16
"""Pixels of a tile's surroundings run with it and cut off: seams show less (A1111 overlaps 8)."""


class _DenseBlock(nn.Module):
    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, growth, 3, 1, 1)
        self.conv2 = nn.Conv2d(features + growth, growth, 3, 1, 1)
        self.conv3 = nn.Conv2d(features + 2 * growth, growth, 3, 1, 1)
        self.conv4 = nn.Conv2d(features + 3 * growth, growth, 3, 1, 1)
        self.conv5 = nn.Conv2d(features + 4 * growth, features, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        found = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            found.append(F.leaky_relu(conv(torch.cat(found, 1)), 0.2))
        return self.conv5(torch.cat(found, 1)) * 0.2 + x


class _RRDB(nn.Module):
    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.rdb1 = _DenseBlock(features, growth)
        self.rdb2 = _DenseBlock(features, growth)
        self.rdb3 = _DenseBlock(features, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator, its parameters named as BasicSR names them."""

    def __init__(
        self, *, channels: int, features: int, growth: int, blocks: int, ups: int, unshuffle: int
    ) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        self.conv_first = nn.Conv2d(channels * unshuffle * unshuffle, features, 3, 1, 1)
        self.body = nn.Sequential(*(_RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        self.ups = nn.ModuleList(nn.Conv2d(features, features, 3, 1, 1) for _ in range(ups))
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, channels, 3, 1, 1)
        self.scale = 2**ups / unshuffle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feature = self.conv_first(x)
        feature = feature + self.conv_body(self.body(feature))
        for up in self.ups:
            feature = F.leaky_relu(up(F.interpolate(feature, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feature), 0.2))


def load_upscaler(info: UpscalerInfo, device: torch.device) -> RRDBNet:
    """The model in ``info.path`` (either key layout), in float32 on ``device``; JobFailed if
    its tensors do not make one."""
    assert info.path is not None
    try:
        raw = load_file(str(info.path))
        state = {canonical_keys(raw.keys())[key]: tensor for key, tensor in raw.items()}
        shape = info.shape
        model = RRDBNet(**shape)
        model.load_state_dict(state, strict=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise JobFailed(
            f"upscaler {info.name!r} cannot be loaded ({type(exc).__name__}: {exc}); an ESRGAN or "
            "Real-ESRGAN (RRDB) .safetensors model in autoimport/upscaler is needed"
        ) from exc
    return model.to(device=device, dtype=torch.float32).eval()


def _to_tensor(image: Image.Image, device: torch.device) -> torch.Tensor:
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1)[None].to(device, torch.float32) / 255.0


def _to_image(tensor: torch.Tensor) -> Image.Image:
    pixels = (tensor[0].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().contiguous()
    return Image.fromarray(pixels.numpy(), "RGB")


def _forward(model: RRDBNet, x: torch.Tensor) -> torch.Tensor:
    """The model on ``x``, its sides padded (reflected) to a multiple of its pixel unshuffle
    and the padding's output cut off again, as Real-ESRGAN does for its 2x and 1x models."""
    _, _, height, width = x.shape
    step = model.unshuffle
    extra_h, extra_w = -height % step, -width % step
    if extra_h or extra_w:
        x = F.pad(x, (0, extra_w, 0, extra_h), mode="reflect" if min(height, width) > step else "replicate")
    out = model(x)
    scale = round(model.scale)
    return out[:, :, : height * scale, : width * scale]


def _tiled(model: RRDBNet, x: torch.Tensor, tile: int, pad: int) -> torch.Tensor:
    """The model on ``x`` tile by tile (``tile`` input pixels a side, each run with ``pad``
    pixels of its surroundings, whose output is cut off), so a large image needs the memory
    of one tile's activations; exact where ``pad`` covers the network's reach."""
    _, _, height, width = x.shape
    if height <= tile and width <= tile:
        return _forward(model, x)
    scale = round(model.scale)
    out = x.new_zeros((x.shape[0], x.shape[1], height * scale, width * scale))
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            t0, l0 = max(top - pad, 0), max(left - pad, 0)
            t1, l1 = min(top + tile + pad, height), min(left + tile + pad, width)
            block = _forward(model, x[:, :, t0:t1, l0:l1])
            h, w = min(tile, height - top), min(tile, width - left)
            out[:, :, top * scale : (top + h) * scale, left * scale : (left + w) * scale] = block[
                :,
                :,
                (top - t0) * scale : (top - t0 + h) * scale,
                (left - l0) * scale : (left - l0 + w) * scale,
            ]
    return out


@torch.inference_mode()
def upscale(
    model: RRDBNet, image: Image.Image, size: tuple[int, int], *, tile: int = TILE, pad: int = TILE_PAD
) -> Image.Image:
    """``image`` at ``size`` (width, height): through the model until it is at least that big
    (at most MAX_PASSES times), then resized to it with Lanczos, as A1111 does; an image
    larger than ``tile`` runs in tiles."""
    device = next(model.parameters()).device
    for _ in range(MAX_PASSES):
        if image.width >= size[0] and image.height >= size[1]:
            break
        image = _to_image(_tiled(model, _to_tensor(image, device), tile, pad))
        if model.scale <= 1:  # a 1x model restores; running it again would not enlarge
            break
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


class UpscalerCache:
    """Loaded upscalers by sha256; with ``pipelines``, within the hot pipelines' budget."""

    def __init__(
        self, device: torch.device, capacity: int = KEPT, pipelines: PipelineCache | None = None
    ) -> None:
        self.device = device
        self._pipelines = pipelines
        self._loaded: LRUCache[str, torch.nn.Module] = (
            pipelines.add_on_cache(capacity) if pipelines is not None else LRUCache(max_items=capacity)
        )

    def get(self, info: UpscalerInfo) -> RRDBNet:
        model = self._loaded.get(info.sha256)
        if model is None:
            if self._pipelines is not None and info.path is not None:
                self._pipelines.make_room_for(weights_bytes([info.path], torch.float32))
            model = load_upscaler(info, self.device)
            self._loaded.put(info.sha256, model)
            logger.info("upscaler %s (%s, %gx) loaded", info.name, info.sha256[:10], model.scale)
        return model
