"""Images in and out of archbench: PNG for the store, the report and serving, and the validation
examples a vision-language run keeps with its answers (the report shows them beside the truth).

A served image is checked before any model sees it: it must decode as PNG (or another format PIL
reads), be at most ``MAX_IMAGE_BYTES``, and have the model's size and channels.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_BYTES = 1 << 20  # a served image larger than this is refused before decoding
SAMPLES = 8  # validation examples a run keeps with its answers


class ImageRefused(ValueError):
    """A served image that cannot be read as the model's input; the message says why."""


def png_base64(image: np.ndarray) -> str:
    """(C, H, W) uint8 (C = 1 or 3) -> a base64 PNG."""
    pixels = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def tensor_png(image: torch.Tensor) -> str:
    """(C, H, W) float in [0, 1], as a model reads it -> a base64 PNG."""
    return png_base64((image * 255).round().to(torch.uint8).numpy())


def image_tensor(encoded: str, channels: int, size: int) -> torch.Tensor:
    """A base64 image (PNG) -> (1, channels, size, size) float in [0, 1], as the model reads it;
    refused (ImageRefused) when it is not base64, too large, not an image, or of another size or mode."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRefused("image: not valid base64") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise ImageRefused(f"image: {len(raw):,} bytes, more than the {MAX_IMAGE_BYTES:,} accepted")
    try:
        with warnings.catch_warnings():  # a huge size is refused below, before any pixel is decoded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(raw))  # reads the header only: size and mode are checked first
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ImageRefused("image: not a decodable image of a sensible size (send a base64 PNG)") from None
    want = {1: "L", 3: "RGB"}[channels]
    if picture.size != (size, size):
        raise ImageRefused(f"image: {picture.size[0]}×{picture.size[1]} pixels, but this model reads {size}×{size}")
    if picture.mode != want:
        raise ImageRefused(f"image: mode {picture.mode} ({len(picture.getbands())} channels), but this model reads "
                           f"{channels} channel{'s' if channels > 1 else ''} ({want})")
    try:
        picture.load()
    except (OSError, ValueError):
        raise ImageRefused("image: its pixels do not decode (a truncated or corrupt PNG)") from None
    pixels = np.asarray(picture, dtype=np.uint8)
    pixels = pixels[None] if channels == 1 else np.transpose(pixels, (2, 0, 1))
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]


@torch.no_grad()
def answer_samples(model, batches, types: np.ndarray, question_types: list[str], decode, device, n: int = SAMPLES) -> list[dict]:
    """The first n validation examples: image (base64 PNG), question type, question, the true answer
    and the model's (its most likely token at every answer position, given the true ones before:
    what accuracy scores)."""
    was_training = model.training
    model.eval()
    samples: list[dict] = []
    for x, y, images in batches:
        logits = model(x.to(device), images=images.to(device)).logits.float().cpu()
        for row in range(x.shape[0]):
            if len(samples) == n:
                break
            labelled = y[row] >= 0
            question = x[row][: int(labelled.nonzero()[0])].tolist()
            samples.append({
                "image": tensor_png(images[row]),
                "type": question_types[int(types[len(samples)])],
                "question": decode(question[1:]),  # without <bos>
                "truth": decode(y[row][labelled].tolist()[:-1]),  # without <eos>
                "answer": decode(logits[row].argmax(-1)[labelled].tolist()[:-1]),
            })
        if len(samples) == n:
            break
    model.train(was_training)
    return samples
