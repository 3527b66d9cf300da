"""Image in for the ViT family: an image file read with Pillow and made into the pixels ViTImageProcessor makes
(RGB or grey, bilinear resize, x/255, then (x − mean)/std with preprocessor_config.json's image_mean/std).

    pixels = read_image("photo.png", (224, 224), 3, model_dir)   # (1, 3, 224, 224) float32

An untrusted file is bounded before it is decoded: its size on disk (IMAGE_MAX_BYTES) and the pixel count its
header declares (IMAGE_MAX_PIXELS: a 100000² PNG header is a few dozen bytes and would decode to 30 GB).

Shape legend: C channels, H, W the model's image size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["read_image", "normalization", "IMAGE_MAX_BYTES", "IMAGE_MAX_PIXELS"]

IMAGE_MAX_BYTES = 256 << 20
IMAGE_MAX_PIXELS = 1 << 28  # 16384²: far above any photograph a ViT is shown (it is resized to 224² anyway)
_PREPROCESSOR_MAX_BYTES = 1 << 20


def normalization(model_dir: Union[str, os.PathLike, None], channels: int) -> Tuple[list, list]:
    """(image_mean, image_std) from the directory's preprocessor_config.json, else 0.5 and 0.5 per channel
    (ViTImageProcessor's defaults). Entries of the wrong length or type are ignored, as transformers would fail."""
    mean, std = [0.5] * channels, [0.5] * channels
    if model_dir is None:
        return mean, std
    pp = Path(model_dir) / "preprocessor_config.json"
    if pp.is_file():
        if pp.stat().st_size >= _PREPROCESSOR_MAX_BYTES:
            raise ValueError(f"preprocessor_config.json: {str(pp)!r} is {pp.stat().st_size} bytes, more than the "
                             f"{_PREPROCESSOR_MAX_BYTES} read here")
        try:
            doc = json.loads(pp.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise ValueError(f"preprocessor_config.json: {str(pp)!r} cannot be read ({e})") from None
        if isinstance(doc, dict):
            for key, cur in (("image_mean", mean), ("image_std", std)):
                v = doc.get(key)
                if isinstance(v, list) and len(v) == channels and all(
                        isinstance(u, (int, float)) and not isinstance(u, bool) for u in v):
                    cur[:] = [float(u) for u in v]
    return mean, std


def read_image(file: Union[str, os.PathLike], size: Sequence[int], channels: int = 3,
               model_dir: Union[str, os.PathLike, None] = None) -> Tensor:
    """An image file -> (1, C, H, W) float32 as ViTImageProcessor makes it. size: (H, W); channels: 3 (RGB) or
    1 (grey); model_dir: where preprocessor_config.json's image_mean/std are read (None: 0.5, 0.5)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("read_image: reading images needs Pillow (pip install pillow)") from None
    f = Path(file)
    if f.stat().st_size > IMAGE_MAX_BYTES:
        raise ValueError(f"image: {str(f)!r} is {f.stat().st_size} bytes, more than the {IMAGE_MAX_BYTES} read here")
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 (grey) or 3 (RGB), got {channels!r}")
    H, W = size
    mean, std = normalization(model_dir, channels)
    try:
        with Image.open(f) as im:  # reads the header only: the declared size is known before any decoding
            w, h = im.size
            if w * h > IMAGE_MAX_PIXELS:
                raise ValueError(f"image: {str(f)!r} declares {w}×{h} pixels, more than the {IMAGE_MAX_PIXELS} "
                                 f"decoded here")
            im = im.convert("RGB" if channels == 3 else "L").resize((W, H), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)  # (H, W[, 3])
    except Image.DecompressionBombError as e:  # Pillow's own limit on the declared size, before ours
        raise ValueError(f"image: {str(f)!r} declares too many pixels to decode ({e})") from None
    except (OSError, SyntaxError, EOFError) as e:  # "cannot identify image file", a truncated or broken stream
        raise ValueError(f"image: {str(f)!r} is not an image this reader can open ({e})") from None
    x = x[..., None] if x.dim() == 2 else x  # (H, W, C)
    x = (x - torch.tensor(mean)) / torch.tensor(std)  # (H, W, C)
    return x.permute(2, 0, 1)[None].contiguous()  # (1, C, H, W)
