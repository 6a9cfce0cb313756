"""The images of a request: multipart files or a raw image body (:func:`read_uploads`),
each checked from its header (type, emptiness, pixel count) before any pixel is decoded
(:func:`check_upload`)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from fastapi import Request
from PIL import Image, UnidentifiedImageError

from .limits import ApiError, ServeConfig

# Content types taken as images (the formats docs/photos.md lists); "" and
# application/octet-stream are sniffed from the bytes.
IMAGE_TYPES = {
    f"image/{s}"
    for s in ("jpeg", "jpg", "pjpeg", "png", "webp", "bmp", "x-bmp", "x-ms-bmp", "tiff", "gif")
}
SNIFFED_TYPES = {"", "application/octet-stream"}
SUPPORTED = "JPEG, PNG, WebP, BMP, TIFF or GIF"
HOW_TO_SEND = (
    f"send multipart/form-data with image files, or the image itself with its image/* type "
    f"({SUPPORTED})"
)


@dataclass
class Upload:
    name: str
    content_type: str
    data: bytes
    pixels: int = 0  # width x height from the header (check_upload)


async def read_uploads(request: Request, cfg: ServeConfig) -> list[Upload]:
    """The images of a request: multipart files, or the raw body with an image type."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";")[0].strip().lower()
    if media == "multipart/form-data":
        form = await request.form(max_files=cfg.max_images, max_fields=100)
        uploads = []
        for _, value in form.multi_items():
            if isinstance(value, str):
                continue
            data = await value.read()
            name = (value.filename or "upload")[:200]
            uploads.append(Upload(name, value.content_type or "", data))
            await value.close()
        if not uploads:
            raise ApiError(400, "no image in the upload: send files in a multipart field")
        return uploads
    if media == "application/octet-stream" or media.startswith("image/"):
        name = (request.query_params.get("name") or "upload")[:200]
        return [Upload(name, media, await request.body())]
    if not await has_body(request):
        raise ApiError(400, f"no image in the request (empty body): {HOW_TO_SEND}")
    what = f"unsupported content type {media!r}" if media else "no Content-Type header"
    raise ApiError(415, f"{what}: {HOW_TO_SEND}")


async def has_body(request: Request) -> bool:
    """Whether the body has a byte: read up to its first non-empty chunk, no further."""
    async for chunk in request.stream():
        if chunk:
            return True
    return False


def check_upload(up: Upload, max_pixels: int) -> tuple[int, int]:
    """Type, emptiness and pixel count from the header, before any pixel is decoded."""
    ctype = up.content_type.split(";")[0].strip().lower()
    if ctype not in IMAGE_TYPES and ctype not in SNIFFED_TYPES:
        raise ApiError(415, f"{up.name}: type {ctype!r} is not supported: send {SUPPORTED}")
    if not up.data:
        raise ApiError(400, f"{up.name}: empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(up.data)) as im:
                w, h = im.size
        except UnidentifiedImageError:
            raise ApiError(
                400, f"{up.name}: not an image (or a format Pillow cannot read)"
            ) from None
        except Image.DecompressionBombError:
            raise ApiError(
                413, f"{up.name}: too many pixels (a decompression-bomb guard)"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ApiError(400, f"{up.name}: truncated or corrupt image ({e})") from None
    if max_pixels and w * h > max_pixels:
        raise ApiError(
            413,
            f"{up.name}: {w}x{h} is {w * h / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:g} megapixels",
        )
    up.pixels = w * h
    return w, h
