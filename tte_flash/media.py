"""Reading images and videos: the pixels, and their sizes without the pixels.

* :func:`load_image` - a PIL RGB image from a PIL image, a path, a URL, encoded bytes or an array;
  :func:`image_size` - its (height, width) from the header only (for length estimates);
* :func:`load_video_frames` - a video (file, folder of frames, list of images) as at most ``max_frames``
  frames spread uniformly (:func:`sample_frame_indices`); only those frames are read or decoded
  (torchcodec, else PyAV seeking by the packets' timestamps); :func:`probe_video_file` - frame count and
  size from a file's header;
* :func:`make_image_processor` / :func:`smart_resize` - Qwen2-VL's image processor and resize rule.

Memory (issue 18): an encoded image's size is read from its header and checked against a pixel budget per
image before any pixel is decoded, and the sampled frames of a video against a budget per video (all of them
together, before the first is decoded): :class:`MediaBudgetError` names the file, its size and the budget.
An image within the budget but over 4x :data:`DECODE_MAX_PIXELS` is decoded at a reduced size (JPEG: the
decoder's own 1/2, 1/4, 1/8 scaling; other formats: reduced by an integer factor right after decoding) that
stays above :data:`DECODE_MAX_PIXELS`, over any image processor's budget, so the processor's resize sees
nearly the same image. Budgets: ``max_pixels`` / ``max_video_pixels`` arguments, else the environment
variables ``TTE_FLASH_MAX_IMAGE_PIXELS`` / ``TTE_FLASH_MAX_VIDEO_PIXELS``, else the defaults below. URLs are
fetched by :func:`tte_flash.fetch.fetch_url` (timeouts, a byte cap, no internal addresses).
"""
from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .fetch import fetch_url

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # per image: PIL's own decompression-bomb threshold (about 9459 x 9459)
DEFAULT_MAX_VIDEO_PIXELS = 256 * 2**20  # per video, its sampled frames together (32 frames of 4K: 265 M)
DECODE_MAX_PIXELS = 4096 * 4096  # images over 4x this are decoded reduced, to no fewer pixels than this
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "I", "F")  # modes PIL's Image.reduce takes


class MediaBudgetError(ValueError):
    """An image or video over its pixel budget, found from its header before decoding."""


def pixel_budgets(max_pixels: int | None = None, max_video_pixels: int | None = None) -> tuple[int, int]:
    """(per image, per video) pixel budgets: the arguments, else ``$TTE_FLASH_MAX_IMAGE_PIXELS`` /
    ``$TTE_FLASH_MAX_VIDEO_PIXELS``, else :data:`DEFAULT_MAX_IMAGE_PIXELS` / :data:`DEFAULT_MAX_VIDEO_PIXELS`."""
    return (_budget(max_pixels, "TTE_FLASH_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS),
            _budget(max_video_pixels, "TTE_FLASH_MAX_VIDEO_PIXELS", DEFAULT_MAX_VIDEO_PIXELS))


def _budget(given: int | None, variable: str, default: int) -> int:
    if given is not None:
        return int(given)
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{variable}={text!r}: expected a positive number of pixels")
    return value


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"


def check_image_pixels(name: str, size: tuple[int, int], max_pixels: int) -> None:
    """``MediaBudgetError`` when an image of ``size`` (width, height) is over ``max_pixels``."""
    width, height = size
    if width * height > max_pixels:
        raise MediaBudgetError(f"{name} is {width}x{height} = {_megapixels(width * height)}, over the budget of "
                               f"{_megapixels(max_pixels)} per image (TTE_FLASH_MAX_IMAGE_PIXELS raises it); it "
                               "was not decoded")


def check_video_pixels(name: str, sizes: list[tuple[int, int]], max_pixels: int, max_video_pixels: int) -> None:
    """``MediaBudgetError`` when one of a video's sampled frames (sizes: (width, height) each) is over the
    budget per image, or all of them together over ``max_video_pixels``; checked before any frame is decoded."""
    for number, size in enumerate(sizes, 1):
        check_image_pixels(f"{name}: sampled frame {number} of {len(sizes)}", size, max_pixels)
    total = sum(width * height for width, height in sizes)
    if total > max_video_pixels:
        shapes = sorted({f"{width}x{height}" for width, height in sizes})
        raise MediaBudgetError(f"{name}: its {len(sizes)} sampled frames ({', '.join(shapes)}) are "
                               f"{_megapixels(total)} together, over the budget of {_megapixels(max_video_pixels)} "
                               "per video (TTE_FLASH_MAX_VIDEO_PIXELS raises it); no frame was decoded")


def make_image_processor(min_pixels: int, max_pixels: int):
    """Qwen2-VL's PIL image processor (no torchvision needed) with the given pixel budget."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:  # older transformers 5.x
        from transformers import Qwen2VLImageProcessor as cls
    return cls(min_pixels=min_pixels, max_pixels=max_pixels)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule (the size the image processor resizes an image to)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as rule
    except ImportError:  # older transformers 5.x
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as rule
    return rule(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def _pixel_budget(image_processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a Qwen2-VL image processor, across transformers versions."""
    size = image_processor.size
    get = (lambda key: size.get(key)) if isinstance(size, dict) else (lambda key: getattr(size, key, None))
    min_pixels = getattr(image_processor, "min_pixels", None) or get("shortest_edge") or get("min_pixels")
    max_pixels = getattr(image_processor, "max_pixels", None) or get("longest_edge") or get("max_pixels")
    return int(min_pixels), int(max_pixels)


ARRAY_TYPES = (bytes, bytearray, np.ndarray, torch.Tensor)  # image data given directly


def load_image(image, max_pixels: int | None = None) -> Image.Image:
    """A PIL RGB image from a PIL image, a path, an http(s) URL, encoded bytes, or an array/tensor
    (HWC or CHW, uint8 or floats in [0, 1]: transformers' ``to_pil_image``); clear errors naming the input.

    Encoded images (a path, bytes, a URL's body) are checked against the pixel budget per image
    (``max_pixels``, see :func:`pixel_budgets`) from their header, before decoding; large ones are decoded
    reduced (module docstring). A URL is fetched by :func:`tte_flash.fetch.fetch_url`."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return _decode(io.BytesIO(image), f"image from {len(image)} bytes", max_pixels)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        if image.ndim not in (2, 3):
            raise ValueError(f"an image array must be 2-D (H, W) or 3-D (HWC or CHW), got shape {tuple(image.shape)}; "
                             "pass a list for several images")
        from transformers.image_transforms import to_pil_image
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        return to_pil_image(array[..., None] if array.ndim == 2 else array).convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise ValueError(f"image must be a PIL image, a path, a URL, bytes or an array, got {type(image).__name__}")
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        return _decode(io.BytesIO(fetch_url(image)), f"image {image}", max_pixels)
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return _decode(path, f"image {path}", max_pixels)


def _decode(source, name: str, max_pixels: int | None) -> Image.Image:
    """Open ``source`` (a path or a file object), check its header's size against the budget, then decode
    it as RGB, reduced when it is over 4x :data:`DECODE_MAX_PIXELS`."""
    max_pixels = pixel_budgets(max_pixels)[0]
    try:
        with _open(source) as img:
            check_image_pixels(name, img.size, max_pixels)
            factor = _reduce_factor(img.size)
            if factor > 1:  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still over the reduced size
                img.draft("RGB", (img.size[0] // factor, img.size[1] // factor))
                factor = _reduce_factor(img.size)
            if factor > 1:
                reducible = img if img.mode in REDUCIBLE_MODES else img.convert("RGB")
                return reducible.reduce(factor).convert("RGB")
            return img.convert("RGB")
    except MediaBudgetError:
        raise
    except Image.DecompressionBombError as err:  # over PIL's own limit, which Image.open checks first
        raise MediaBudgetError(f"{name}: {err} (PIL's Image.MAX_IMAGE_PIXELS; the budget per image is "
                               f"{_megapixels(max_pixels)}); it was not decoded") from None
    except Exception as err:  # PIL raises several types for corrupt files
        raise ValueError(f"cannot read {name}: {str(err) or type(err).__name__}") from None


def _open(source) -> Image.Image:
    """``Image.open`` (the header only) without PIL's decompression-bomb warning: the budgets here decide."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


def _reduce_factor(size: tuple[int, int]) -> int:
    """The largest integer factor that keeps an image of ``size`` over :data:`DECODE_MAX_PIXELS` (1: none)."""
    return max(1, math.isqrt(size[0] * size[1] // DECODE_MAX_PIXELS))


def _header_size(image) -> tuple[int, int] | None:
    """(width, height) of an image input from its header; None for a URL or an array (decoded already)."""
    if not isinstance(image, (Image.Image, str, os.PathLike, bytes, bytearray)):
        return None
    size = image_size(image)
    return None if size is None else (size[1], size[0])


def sample_frame_indices(n_frames: int, max_frames: int) -> list[int]:
    """Which of ``n_frames`` frames a video keeps: all of them up to ``max_frames``, else ``max_frames``
    spread uniformly (frame ``int(i * n_frames / max_frames)``); every video source uses this rule."""
    if n_frames <= max_frames:
        return list(range(n_frames))
    step = n_frames / max_frames
    return [int(i * step) for i in range(max_frames)]


def load_video_frames(video, max_frames: int, max_pixels: int | None = None,
                      max_video_pixels: int | None = None) -> list[Image.Image]:
    """Frames of a video (a file, a folder of images, or a list of images), sampled uniformly to at most
    ``max_frames`` and padded to an even count. Only the sampled frames are read or decoded, and only after
    their sizes (from the headers) pass the pixel budgets (:func:`check_video_pixels`, :func:`pixel_budgets`)."""
    max_pixels, max_video_pixels = pixel_budgets(max_pixels, max_video_pixels)
    if isinstance(video, (list, tuple)):
        chosen = [video[i] for i in sample_frame_indices(len(video), max_frames)]
        _check_frames(f"video of {len(video)} frames", chosen, max_pixels, max_video_pixels)
        frames = [load_image(frame, max_pixels) for frame in chosen]
    else:
        path = Path(video)
        if not path.exists():
            raise FileNotFoundError(f"video not found: {path}")
        if path.is_dir():
            files = _frame_files(path)
            chosen = [files[i] for i in sample_frame_indices(len(files), max_frames)]
            _check_frames(f"video {path} ({len(files)} frames)", chosen, max_pixels, max_video_pixels)
            frames = [load_image(file, max_pixels) for file in chosen]
        else:
            frames = decode_video_file(path, max_frames, max_pixels, max_video_pixels)
    if not frames:
        raise ValueError(f"video {video!r} has no frames")
    if len(frames) % 2:
        frames.append(frames[-1])
    size = frames[0].size
    return [f if f.size == size else f.resize(size) for f in frames]


def _check_frames(name: str, frames: list, max_pixels: int, max_video_pixels: int) -> None:
    """The budgets of :func:`check_video_pixels` on frames given as images, paths or bytes (headers only)."""
    sizes = [size for size in map(_header_size, frames) if size is not None]
    check_video_pixels(name, sizes, max_pixels, max_video_pixels)


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _video_backend():
    """torchcodec's ``VideoDecoder`` class or the ``av`` module (PyAV), whichever is installed (torchcodec first)."""
    try:
        from torchcodec.decoders import VideoDecoder
        return VideoDecoder
    except ImportError:
        pass
    try:
        import av
        return av
    except ImportError:
        return None


def decode_video_file(path: Path, max_frames: int, max_pixels: int | None = None,
                      max_video_pixels: int | None = None) -> list[Image.Image]:
    """The sampled frames of a video file (:func:`sample_frame_indices`), decoded one by one. torchcodec
    decodes exactly those frames. PyAV reads the packets' timestamps (demuxing, no decoding) to find each
    sampled frame's, then seeks to the keyframe before it and decodes up to it; a file whose packets carry
    no timestamps is decoded in order, keeping at most ``2 * max_frames`` frames (sampled from those).
    The frame size and the number of sampled frames are checked against the pixel budgets first."""
    max_pixels, max_video_pixels = pixel_budgets(max_pixels, max_video_pixels)
    backend = _video_backend()
    if backend is None:
        raise ImportError(f"reading {path} needs PyAV or torchcodec: pip install 'tte-flash[video]' (or pass a "
                          "folder of frames)")
    try:
        if isinstance(backend, type):  # torchcodec
            decoder = backend(str(path))
            indices = sample_frame_indices(len(decoder), max_frames)
            size = (int(decoder.metadata.width), int(decoder.metadata.height))
            check_video_pixels(f"video {path}", [size] * len(indices), max_pixels, max_video_pixels)
            batch = decoder.get_frames_at(indices=indices).data  # (N, C, H, W) uint8
            return [Image.fromarray(frame.permute(1, 2, 0).numpy()).convert("RGB") for frame in batch]
        with backend.open(str(path)) as container:
            stream = container.streams.video[0]
            size = (int(stream.codec_context.width), int(stream.codec_context.height))
            frames_stated = int(stream.frames or max_frames)  # the header's count; the sample is at most max_frames
            check_video_pixels(f"video {path}", [size] * min(frames_stated, max_frames), max_pixels,
                               max_video_pixels)
            timestamps = [packet.pts for packet in container.demux(stream) if packet.size]  # display order: sort
            if timestamps and None not in timestamps:
                frames = _pyav_seek(container, stream, sorted(timestamps), max_frames)
            else:
                container.seek(0)
                frames = _pyav_in_order(container, stream, max_frames)
            return [frame.to_image().convert("RGB") for frame in frames]
    except MediaBudgetError:
        raise
    except Exception as err:
        raise ValueError(f"cannot read video {path}: {str(err) or type(err).__name__}") from None


def _pyav_seek(container, stream, timestamps: list[int], max_frames: int) -> list:
    """The frames at the sampled indices of ``timestamps`` (every frame's, in display order), by seeking."""
    frames = []
    for index in sample_frame_indices(len(timestamps), max_frames):
        target = timestamps[index]
        container.seek(target, stream=stream, backward=True, any_frame=False)
        frame = next((f for f in container.decode(stream) if f.pts is not None and f.pts >= target), None)
        if frame is None:
            raise ValueError(f"no frame at timestamp {target} (frame {index} of {len(timestamps)})")
        frames.append(frame)
    return frames


def _pyav_in_order(container, stream, max_frames: int) -> list:
    """Decode every frame in order, keeping every ``stride``-th; the stride doubles whenever more than
    ``2 * max_frames`` are kept, so memory stays bounded; then the kept frames are sampled uniformly."""
    kept, stride = [], 1
    for position, frame in enumerate(container.decode(stream)):
        if position % stride == 0:
            kept.append(frame)
            if len(kept) > 2 * max_frames:
                kept, stride = kept[::2], stride * 2
    return [kept[i] for i in sample_frame_indices(len(kept), max_frames)]


def probe_video_file(path: Path, max_frames: int) -> tuple[int, int, int] | None:
    """(frame count, height, width) from a video file's header, or None when unknown (no backend, or the
    container does not say); an unstated frame count counts as ``max_frames``. Used to estimate lengths;
    decoding errors are raised later, clearly."""
    backend = _video_backend()
    try:
        if isinstance(backend, type):
            meta = backend(str(path)).metadata
            return int(meta.num_frames), int(meta.height), int(meta.width)
        if backend is not None:
            with backend.open(str(path)) as container:
                stream = container.streams.video[0]
                return int(stream.frames or max_frames), int(stream.codec_context.height), \
                    int(stream.codec_context.width)
    except Exception:
        return None
    return None


def image_size(image) -> tuple[int, int] | None:
    """(height, width) of an image input without decoding its pixels (None for a URL); the same errors
    as :func:`load_image` for a missing or unreadable file."""
    if isinstance(image, Image.Image):
        return image.size[::-1]
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        return None
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with _open(path) as img:  # reads the header only
                return img.size[::-1]
        except Exception as err:
            raise ValueError(f"cannot read image {path}: {err}") from None
    if isinstance(image, (bytes, bytearray)):
        try:
            with _open(io.BytesIO(image)) as img:
                return img.size[::-1]
        except Exception as err:
            raise ValueError(f"cannot read image from {len(image)} bytes: {err}") from None
    return load_image(image).size[::-1]  # an array: its pixels are in memory already
