"""Reading images and videos: the pixels, and their sizes without the pixels.

* :func:`load_image` - a PIL RGB image from a PIL image, a path, a URL, encoded bytes or an array;
  :func:`image_size` - its (height, width) from the header only (for length estimates);
* :func:`load_video_frames` - a video (file, folder of frames, list of images) as at most ``max_frames``
  frames spread uniformly (:func:`sample_frame_indices`); only those frames are read or decoded
  (torchcodec, else PyAV seeking by the packets' timestamps); :func:`probe_video_file` - frame count and
  size from a file's header;
* :func:`make_image_processor` / :func:`smart_resize` - Qwen2-VL's image processor and resize rule.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
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


def load_image(image) -> Image.Image:
    """A PIL RGB image from a PIL image, a path, an http(s) URL, encoded bytes, or an array/tensor
    (HWC or CHW, uint8 or floats in [0, 1]: transformers' ``to_pil_image``); clear errors naming the input."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image)) as img:
                return img.convert("RGB")
        except Exception as err:
            raise ValueError(f"cannot read image from {len(image)} bytes: {err}") from None
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
        from transformers.image_utils import load_image as load_url
        try:
            return load_url(image).convert("RGB")
        except Exception as err:
            raise ValueError(f"cannot load image {image}: {err}") from None
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:  # PIL raises several types for corrupt files
        raise ValueError(f"cannot read image {path}: {err}") from None


def sample_frame_indices(n_frames: int, max_frames: int) -> list[int]:
    """Which of ``n_frames`` frames a video keeps: all of them up to ``max_frames``, else ``max_frames``
    spread uniformly (frame ``int(i * n_frames / max_frames)``); every video source uses this rule."""
    if n_frames <= max_frames:
        return list(range(n_frames))
    step = n_frames / max_frames
    return [int(i * step) for i in range(max_frames)]


def load_video_frames(video, max_frames: int) -> list[Image.Image]:
    """Frames of a video (a file, a folder of images, or a list of images), sampled uniformly to at most
    ``max_frames`` and padded to an even count. Only the sampled frames are read or decoded."""
    if isinstance(video, (list, tuple)):
        frames = [load_image(video[i]) for i in sample_frame_indices(len(video), max_frames)]
    else:
        path = Path(video)
        if not path.exists():
            raise FileNotFoundError(f"video not found: {path}")
        if path.is_dir():
            files = _frame_files(path)
            frames = [load_image(files[i]) for i in sample_frame_indices(len(files), max_frames)]
        else:
            frames = decode_video_file(path, max_frames)
    if not frames:
        raise ValueError(f"video {video!r} has no frames")
    if len(frames) % 2:
        frames.append(frames[-1])
    size = frames[0].size
    return [f if f.size == size else f.resize(size) for f in frames]


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


def decode_video_file(path: Path, max_frames: int) -> list[Image.Image]:
    """The sampled frames of a video file (:func:`sample_frame_indices`), decoded one by one. torchcodec
    decodes exactly those frames. PyAV reads the packets' timestamps (demuxing, no decoding) to find each
    sampled frame's, then seeks to the keyframe before it and decodes up to it; a file whose packets carry
    no timestamps is decoded in order, keeping at most ``2 * max_frames`` frames (sampled from those)."""
    backend = _video_backend()
    if backend is None:
        raise ImportError(f"reading {path} needs PyAV or torchcodec: pip install 'tte-flash[video]' (or pass a "
                          "folder of frames)")
    try:
        if isinstance(backend, type):  # torchcodec
            decoder = backend(str(path))
            indices = sample_frame_indices(len(decoder), max_frames)
            batch = decoder.get_frames_at(indices=indices).data  # (N, C, H, W) uint8
            return [Image.fromarray(frame.permute(1, 2, 0).numpy()).convert("RGB") for frame in batch]
        with backend.open(str(path)) as container:
            stream = container.streams.video[0]
            timestamps = [packet.pts for packet in container.demux(stream) if packet.size]  # display order: sort
            if timestamps and None not in timestamps:
                frames = _pyav_seek(container, stream, sorted(timestamps), max_frames)
            else:
                container.seek(0)
                frames = _pyav_in_order(container, stream, max_frames)
            return [frame.to_image().convert("RGB") for frame in frames]
    except Exception as err:
        raise ValueError(f"cannot read video {path}: {err}") from None


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
            with Image.open(path) as img:  # reads the header only
                return img.size[::-1]
        except Exception as err:
            raise ValueError(f"cannot read image {path}: {err}") from None
    if isinstance(image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image)) as img:
                return img.size[::-1]
        except Exception as err:
            raise ValueError(f"cannot read image from {len(image)} bytes: {err}") from None
    return load_image(image).size[::-1]  # an array: its pixels are in memory already
