"""The reward service's wire format, shared by both servers (rewards/server.py, rewards/serving.py) and the client
(rewards/remote.py): base64 PNG/JPEG images in JSON, never pickle, and the checks every request passes before any
pixel is decoded."""

from __future__ import annotations

import base64
import binascii
import io
import json

from PIL import Image

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_PIXELS = 4096 * 4096  # per image
DEFAULT_MAX_REQUEST_PIXELS = 64 * 1024 * 1024  # per request: 64 images of 1024 x 1024 (~200 MB decoded)
DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds for a client to send its whole request


class BadRequest(ValueError):
    status = 400


class TooLarge(BadRequest):
    status = 413


def encode_image(image: Image.Image, image_format: str = "png") -> str:
    """PNG (lossless: remote scores equal local ones) or JPEG (smaller, what Flow-GRPO sends), as base64 text."""
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', not {image_format!r}")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format.upper())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_request(body: bytes, max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
                   ) -> tuple[list[Image.Image], list[str], list[dict]]:
    try:
        request = json.loads(body)
    except RecursionError:
        raise BadRequest("body is JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError, and numbers over Python's digit limit
        raise BadRequest(f"body is not JSON we can read: {error}") from None
    if not isinstance(request, dict) or not {"images", "prompts", "metadata"} <= set(request):
        raise BadRequest("body must be an object with 'images', 'prompts' and 'metadata'")
    images, prompts, metadata = request["images"], request["prompts"], request["metadata"]
    if not all(isinstance(x, list) for x in (images, prompts, metadata)) or not \
            len(images) == len(prompts) == len(metadata):
        raise BadRequest("'images', 'prompts' and 'metadata' must be lists of equal length")
    if not all(isinstance(p, str) for p in prompts) or not all(isinstance(m, dict) for m in metadata):
        raise BadRequest("prompts must be strings and metadata objects")
    return open_images(images, max_request_pixels), prompts, metadata


def open_images(images: list, max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS) -> list[Image.Image]:
    """base64 PNG/JPEG strings as RGB images, every size checked before any pixel is decoded."""
    # first every header (PIL reads only the header on open), so that the sizes are checked before any pixel is
    # decoded: a small PNG can decode to gigabytes
    opened, total = [], 0
    for i, data in enumerate(images):
        try:
            image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        except Image.DecompressionBombError as error:  # PIL's own header check, for the largest ones
            raise TooLarge(f"image {i} is too large: {error}") from None
        except (binascii.Error, TypeError, ValueError, OSError) as error:
            raise BadRequest(f"image {i} is not base64 PNG/JPEG: {type(error).__name__}: {error}") from None
        if image.format not in ("PNG", "JPEG"):
            raise BadRequest(f"image {i} is {image.format}, not PNG or JPEG")
        if image.width * image.height > MAX_PIXELS:
            raise TooLarge(f"image {i} is {image.width}x{image.height}, over {MAX_PIXELS} pixels")
        total += image.width * image.height
        if total > max_request_pixels:
            raise TooLarge(f"the request's images hold over {max_request_pixels} pixels in all; send smaller "
                           "batches")
        opened.append(image)
    decoded = []
    for i, image in enumerate(opened):
        try:
            decoded.append(image.convert("RGB"))
        except (ValueError, OSError, Image.DecompressionBombError) as error:
            raise BadRequest(f"image {i} does not decode: {type(error).__name__}: {error}") from None
    return decoded
