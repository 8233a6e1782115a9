"""From user inputs to packed TTE batches.

``TTEProcessor`` turns each input (a str, a PIL image, an image or video path, or a dict with any of
``text``, ``image``, ``video``, ``instruction``) into a query record: token ids with Qwen2-VL vision
placeholders, the vision tensors, and M-RoPE positions. :func:`collate` lays records out as
``[query][think x K][<emb>][cot]`` (DESIGN.md §3-§4) in a packed batch (one row, padding-free) or a
padded batch, with the per-token ``seq_ids``/``token_types`` the attention needs.
:meth:`TTEProcessor.estimate_length` gives an input's length without decoding pixels (for batching by a
token budget, ``tte_flash.encoding``). Reading images and videos: ``tte_flash.media``.

Choices: a plain string is text unless it ends in an image or video file extension and either has no
whitespace or names an existing file, then it is a path (or, for an image, an http(s) URL); a
``pathlib.Path`` is always a path; bytes, numpy arrays and torch tensors are images. Text is laid out as
``instruction\\n`` + vision + text; MMEB's ``<|image_1|>`` placeholder, when present, marks where the image
goes instead.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .mask import COT, EMB, QUERY, THINK
from .media import (ARRAY_TYPES, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, _frame_files, _pixel_budget, image_size,
                    load_image, load_video_frames, probe_video_file, smart_resize)
from .media import decode_video_file, make_image_processor, sample_frame_indices  # noqa: F401  (re-exported)

INPUT_KEYS = {"text", "image", "video", "instruction"}
IMAGE_PLACEHOLDER = "<|image_1|>"
TEXT, IMAGE, VIDEO = 0, 1, 2  # Qwen2-VL's mm_token_type_ids
SINGLE_INPUT_TYPES = (str, dict, Image.Image, os.PathLike, *ARRAY_TYPES)  # one input, not a list of inputs


def normalize_input(item, index: int = 0) -> dict:
    """One user input as a dict with keys among ``text``, ``image``, ``video``, ``instruction``."""
    if isinstance(item, (Image.Image, *ARRAY_TYPES)):
        return {"image": item}
    if isinstance(item, os.PathLike):  # always a path
        path = Path(item)
        if path.is_dir() or path.suffix.lower() in VIDEO_EXTENSIONS:
            return {"video": path}
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return {"image": path}
        raise ValueError(f"input {index}: {path} is neither a folder of frames nor a file with an image "
                         f"{IMAGE_EXTENSIONS} or video {VIDEO_EXTENSIONS} extension")
    if isinstance(item, str):
        lowered = item.lower()
        if item and (not any(c.isspace() for c in item) or os.path.isfile(item)):
            if lowered.endswith(IMAGE_EXTENSIONS):
                return {"image": item}
            if lowered.endswith(VIDEO_EXTENSIONS):
                return {"video": item}
        item = {"text": item}
    if not isinstance(item, dict):
        raise ValueError(f"input {index}: expected a str, a PIL image, a path or a dict, got {type(item).__name__}")
    unknown = set(item) - INPUT_KEYS
    if unknown:
        raise ValueError(f"input {index}: unknown keys {sorted(unknown)}; allowed: {sorted(INPUT_KEYS)}")
    for key in ("text", "instruction"):
        if item.get(key) is not None and not isinstance(item[key], str):
            raise ValueError(f"input {index}: {key} must be a str, got {type(item[key]).__name__}: {item[key]!r:.80}")
    _check_media(item, index)
    text = item.get("text")
    if not (text or "").strip() and item.get("image") is None and item.get("video") is None:
        raise ValueError(f"input {index}: empty input (no text, image or video)")
    return item


def _check_media(item: dict, index: int) -> None:
    """``ValueError`` naming the input for an image or video of the wrong type, or an image with no pixels."""
    image, video = item.get("image"), item.get("video")
    if image is not None:
        if not isinstance(image, (Image.Image, str, os.PathLike, *ARRAY_TYPES)):
            raise ValueError(f"input {index}: image must be a PIL image, a path, a URL, bytes or an array, "
                             f"got {type(image).__name__}: {image!r:.80}")
        if isinstance(image, Image.Image) and 0 in image.size:
            raise ValueError(f"input {index}: the image is {image.width}x{image.height} pixels (empty)")
        if isinstance(image, (bytes, bytearray)) and not image:
            raise ValueError(f"input {index}: the image is 0 bytes (empty)")
        if hasattr(image, "shape") and 0 in tuple(image.shape):
            raise ValueError(f"input {index}: the image array is empty (shape {tuple(image.shape)})")
    if video is not None and not isinstance(video, (str, os.PathLike, list, tuple)):
        raise ValueError(f"input {index}: video must be a path (a video file or a folder of frames) or a list of "
                         f"frames, got {type(video).__name__}: {video!r:.80}")


@dataclass
class QueryRecord:
    """One tokenised query (or document) before think/emb/cot tokens are appended."""
    input_ids: torch.Tensor  # (Lq,) long
    mm_types: torch.Tensor  # (Lq,) long: 0 text, 1 image, 2 video
    pixel_values: torch.Tensor | None = None  # (n_patches, C*2*14*14)
    image_grid_thw: torch.Tensor | None = None  # (n_images, 3)
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # (3, Lq) M-RoPE positions
    next_position: int = 0  # first text position after the query


def rope_index(mm_types: torch.Tensor, image_grid_thw, video_grid_thw, spatial_merge_size: int):
    """Qwen2-VL M-RoPE positions for one sample: (3, L) and the next text position.

    Text runs count up on all three axes; a vision block of grid (t, h, w) takes temporal, height and
    width indices offset by the current position, and the text after it resumes at
    ``start + max(t, h/merge, w/merge)`` (Qwen2-VL's ``get_rope_index``).
    """
    grids = {IMAGE: iter(image_grid_thw if image_grid_thw is not None else []),
             VIDEO: iter(video_grid_thw if video_grid_thw is not None else [])}
    types = mm_types.tolist()
    chunks, pos, start = [], 0, 0
    while start < len(types):
        kind, end = types[start], start
        while end < len(types) and types[end] == kind:
            end += 1
        if kind == TEXT:
            chunks.append(torch.arange(pos, pos + end - start).expand(3, -1))
            pos += end - start
            start = end
            continue
        t, h, w = (int(x) for x in next(grids[kind]))
        h, w = h // spatial_merge_size, w // spatial_merge_size
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        chunks.append(grid.reshape(3, -1) + pos)
        start += t * h * w
        pos += max(t, h, w)
    positions = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)
    return positions, pos


class TTEProcessor:
    """Tokeniser + image processor + layout rules of one TTE-Flash checkpoint."""

    def __init__(self, tokenizer, image_processor, config):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.spatial_merge_size = config.vision_config.spatial_merge_size
        self.think_token_ids = list(config.think_token_ids)
        self.emb_token_id = config.emb_token_id
        convert = tokenizer.convert_tokens_to_ids
        self.vision_start_id, self.vision_end_id = convert("<|vision_start|>"), convert("<|vision_end|>")

    def __call__(self, item, index: int = 0, max_query_tokens: int | None = None) -> QueryRecord:
        """Tokenise one input into a :class:`QueryRecord` with positions; text beyond ``max_query_tokens``
        (default :attr:`max_query_tokens`) is cut from the end with a warning."""
        item = normalize_input(item, index)
        pieces, record = [], QueryRecord(input_ids=None, mm_types=None)
        if item.get("instruction"):
            pieces.append(self._text(item["instruction"].rstrip("\n") + "\n"))
        text = item.get("text") or ""
        vision = []
        if item.get("image") is not None:
            vision.append(self._image_block(load_image(item["image"]), record))
        if item.get("video") is not None:
            vision.append(self._video_block(item["video"], record))
        if IMAGE_PLACEHOLDER in text and vision:
            before, after = text.split(IMAGE_PLACEHOLDER, 1)
            pieces += [self._text(before), *vision, self._text(after.replace(IMAGE_PLACEHOLDER, ""))]
        else:
            pieces += [*vision, self._text(text.replace(IMAGE_PLACEHOLDER, ""))]
        pieces = self._truncate(pieces, index, self.max_query_tokens if max_query_tokens is None else max_query_tokens)
        record.input_ids = torch.cat([p[0] for p in pieces])
        record.mm_types = torch.cat([p[1] for p in pieces])
        if record.input_ids.numel() == 0:
            raise ValueError(f"input {index}: tokenises to no tokens")
        record.positions, record.next_position = rope_index(record.mm_types, record.image_grid_thw,
                                                            record.video_grid_thw, self.spatial_merge_size)
        return record

    @property
    def max_query_tokens(self) -> int:
        limit = getattr(self.config, "max_query_tokens", None)
        if limit is None:
            limit = self.config.text_config.max_position_embeddings - len(self.think_token_ids) - 1
        return limit

    def estimate_length(self, item, index: int = 0, max_query_tokens: int | None = None) -> int:
        """The input's length in tokens as :meth:`__call__` would make it, without decoding any pixels:
        exact for text and images (Qwen2-VL's resize rule on the size in the image's header) and for videos
        given as frames; a video file's from its header (frame size, and frame count when it states one);
        the pixel budget's most where a size is unknown (a URL)."""
        item = normalize_input(item, index)

        def count(text: str) -> int:
            return len(self.tokenizer(text, add_special_tokens=False).input_ids)
        total = count(item["instruction"].rstrip("\n") + "\n") if item.get("instruction") else 0
        vision = 0
        if item.get("image") is not None:
            size = image_size(item["image"])
            vision += 2 + (self._image_tokens(*size) if size else self._image_tokens(None, None))
        if item.get("video") is not None:
            vision += 2 + self._video_tokens(item["video"])
        text = item.get("text") or ""
        if IMAGE_PLACEHOLDER in text and vision:
            before, after = text.split(IMAGE_PLACEHOLDER, 1)
            total += count(before) + count(after.replace(IMAGE_PLACEHOLDER, ""))
        else:
            total += count(text.replace(IMAGE_PLACEHOLDER, ""))
        limit = self.max_query_tokens if max_query_tokens is None else max_query_tokens
        return min(total + vision, max(limit, vision))

    def _image_tokens(self, height: int | None, width: int | None) -> int:
        """Placeholder tokens of one image (or video frame) of this size; the most the pixel budget allows
        when the size is unknown."""
        ip = self.image_processor
        min_pixels, max_pixels = _pixel_budget(ip)
        factor = ip.patch_size * ip.merge_size
        if height is None:
            return max_pixels // factor**2
        height, width = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        return (height // ip.patch_size) * (width // ip.patch_size) // self.spatial_merge_size**2

    def _video_tokens(self, video) -> int:
        max_frames, n_frames, size = self.config.video_max_frames, self.config.video_max_frames, None
        if isinstance(video, (list, tuple)):
            n_frames, size = len(video), image_size(video[0]) if video else None
        elif Path(video).is_dir():
            files = _frame_files(Path(video))
            n_frames, size = len(files), image_size(files[0]) if files else None
        elif Path(video).is_file():
            probed = probe_video_file(Path(video), max_frames)
            n_frames, size = probed[0] if probed else max_frames, probed[1:] if probed else None
        else:
            raise FileNotFoundError(f"video not found: {video}")
        n_frames = min(n_frames, max_frames)
        n_frames += n_frames % 2
        return n_frames // self.image_processor.temporal_patch_size * self._image_tokens(*(size or (None, None)))

    def _truncate(self, pieces: list, index: int, limit: int) -> list:
        """Drop text tokens from the end until the input fits ``limit`` tokens (vision blocks whole)."""
        total = sum(int(ids.numel()) for ids, _ in pieces)
        if total <= limit:
            return pieces
        excess, pieces = total - limit, list(pieces)
        for j in reversed(range(len(pieces))):
            ids, types = pieces[j]
            if (types != TEXT).any():  # a vision block: kept whole
                continue
            cut = min(excess, int(ids.numel()))
            pieces[j] = (ids[:ids.numel() - cut], types[:types.numel() - cut])
            excess -= cut
            if not excess:
                break
        if excess:
            vision = sum(int(ids.numel()) for ids, types in pieces if (types != TEXT).any())
            raise ValueError(f"input {index}: its image/video blocks alone are {vision} tokens, over "
                             f"max_query_tokens={limit}; lower image_max_pixels or video_max_frames")
        warnings.warn(f"inputs longer than max_query_tokens={limit} tokens are truncated (text from the end; "
                      "images, think tokens and <emb> are kept)", stacklevel=4)
        return pieces

    def _text(self, text: str):
        ids = torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
        return ids, torch.full_like(ids, TEXT)

    def _vision_tokens(self, n_tokens: int, token_id: int, kind: int):
        ids = torch.tensor([self.vision_start_id] + [token_id] * n_tokens + [self.vision_end_id])
        types = torch.full_like(ids, TEXT)
        types[1:-1] = kind
        return ids, types

    def _image_block(self, image: Image.Image, record: QueryRecord):
        out = self.image_processor(images=[image], return_tensors="pt")
        record.pixel_values, record.image_grid_thw = out["pixel_values"], out["image_grid_thw"]
        n_tokens = int(record.image_grid_thw.prod()) // self.spatial_merge_size**2
        return self._vision_tokens(n_tokens, self.config.image_token_id, IMAGE)

    def _video_block(self, video, record: QueryRecord):
        frames = load_video_frames(video, self.config.video_max_frames)
        out = self.image_processor(images=frames, return_tensors="pt")
        grid = out["image_grid_thw"][0]  # each frame: (1, h, w); all frames share one size
        tps = self.image_processor.temporal_patch_size
        per_frame = out["pixel_values"].view(len(frames), int(grid.prod()), -1, tps, self._patch_area())
        # The image processor repeats each frame tps times along time; take one copy per frame and
        # group consecutive frames into temporal patches: (T/tps, N, C, tps, p*p).
        single = per_frame[:, :, :, 0]  # (T, N, C, p*p)
        grouped = single.view(len(frames) // tps, tps, *single.shape[1:]).permute(0, 2, 3, 1, 4)
        record.pixel_values_videos = grouped.reshape(-1, per_frame.shape[2] * tps * self._patch_area())
        record.video_grid_thw = torch.tensor([[len(frames) // tps, int(grid[1]), int(grid[2])]])
        n_tokens = int(record.video_grid_thw.prod()) // self.spatial_merge_size**2
        return self._vision_tokens(n_tokens, self.config.video_token_id, VIDEO)

    def _patch_area(self) -> int:
        return self.image_processor.patch_size**2

    def tokenize_cot(self, text: str) -> list[int]:
        """Token ids of a reasoning trace, ending with the tokenizer's EOS."""
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]


def append_text(record: QueryRecord, token_ids: list[int]) -> QueryRecord:
    """The record with ``token_ids`` appended as query text (positions continue after the query)."""
    ids = torch.tensor(token_ids, dtype=torch.long)
    n, p = ids.numel(), record.next_position
    return QueryRecord(input_ids=torch.cat([record.input_ids, ids]),
                       mm_types=torch.cat([record.mm_types, torch.full((n,), TEXT)]),
                       pixel_values=record.pixel_values, image_grid_thw=record.image_grid_thw,
                       pixel_values_videos=record.pixel_values_videos, video_grid_thw=record.video_grid_thw,
                       positions=torch.cat([record.positions, torch.arange(p, p + n).expand(3, -1)], dim=1),
                       next_position=p + n)


@dataclass
class TTEBatch:
    """A collated batch: tensors the model's forward takes, plus where to read outputs."""
    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (3, B, L)
    seq_ids: torch.Tensor  # (B, L) int32, non-decreasing row after row
    token_types: torch.Tensor  # (B, L) uint8
    emb_index: torch.Tensor  # (N,) flat index into B*L of each sample's <emb>
    cot_pred_index: torch.Tensor  # (M,) flat index of the token whose logits predict each COT token
    cot_targets: torch.Tensor  # (M,) the COT token ids
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    def to(self, device, dtype=None):
        """Move tensors to ``device`` (pixel values also to the vision ``dtype``)."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                cast = dtype if name.startswith("pixel_values") and dtype is not None else None
                setattr(self, name, value.to(device=device, dtype=cast))
        return self


def sample_layout(record: QueryRecord, think_ids: list[int], emb_id: int, cot_ids: list[int] | None):
    """ids, types, positions (3, n) of one sample laid out as [query][think][emb][cot]."""
    k, m, p = len(think_ids), len(cot_ids or []), record.next_position
    ids = torch.cat([record.input_ids, torch.tensor(think_ids + [emb_id] + list(cot_ids or []), dtype=torch.long)])
    types = torch.cat([torch.full((record.input_ids.numel(),), QUERY), torch.full((k,), THINK),
                       torch.tensor([EMB]), torch.full((m,), COT)])
    appended = torch.cat([torch.arange(p, p + k), torch.tensor([p + k]), torch.arange(p + k, p + k + m)])
    positions = torch.cat([record.positions, appended.expand(3, -1)], dim=1)
    return ids, types, positions


def collate(records: list[QueryRecord], think_ids: list[int], emb_id: int, *, think_tokens,
            cot_ids: list | None = None, packed: bool = True, pad_id: int = 0, fill_rows: bool = False) -> TTEBatch:
    """Lay out ``records`` as [query][think][emb][cot] samples in one packed row or a padded batch.

    ``think_tokens`` is an int or one int per record; ``cot_ids`` is None or one list (or None) per record.
    COT_1 is predicted from the last think token (the last query token when K=0), COT_j from COT_{j-1}.

    ``fill_rows`` (padded batches only): a row holds as many whole samples as fit in the longest sample's
    length (first fit, longest first) instead of one, so short samples (targets beside queries with traces)
    do not each cost a row of padding; the mask keeps samples apart, as in a packed row. Embeddings, COT
    targets and their order are the same as without it (record order).
    """
    n = len(records)
    ks = [think_tokens] * n if isinstance(think_tokens, int) else list(think_tokens)
    cots = cot_ids if cot_ids is not None else [None] * n
    samples = [sample_layout(r, think_ids[:k], emb_id, c) for r, k, c in zip(records, ks, cots)]
    lengths = [s[0].numel() for s in samples]
    if packed:
        rows, width = [list(range(n))], sum(lengths)
    elif fill_rows and n:
        rows, width = _fill_rows(lengths), max(lengths)
    else:
        rows, width = [[i] for i in range(n)], max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros(3, len(rows), width, dtype=torch.long)
    seq_ids = torch.zeros(len(rows), width, dtype=torch.int32)
    types = torch.zeros(len(rows), width, dtype=torch.uint8)
    emb_index, cot_pred, cot_tgt = [0] * n, [[] for _ in range(n)], [[] for _ in range(n)]
    next_seq = 0
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            ids, tt, pos = samples[i]
            sl = slice(offset, offset + ids.numel())
            input_ids[r, sl], types[r, sl], positions[:, r, sl] = ids, tt.to(torch.uint8), pos
            seq_ids[r, sl] = next_seq
            next_seq += 1
            base = r * width + offset
            emb_pos = base + int((tt == EMB).nonzero())
            emb_index[i] = emb_pos
            m = len(cots[i] or [])
            if m:
                first_cot = emb_pos + 1
                cot_pred[i] = [emb_pos - 1] + list(range(first_cot, first_cot + m - 1))
                cot_tgt[i] = list(cots[i])
            offset += ids.numel()
        if offset < width:  # padding is a sample of its own so rows never see it
            seq_ids[r, offset:] = next_seq
            next_seq += 1
    vision = {}
    laid_out = [records[i] for members in rows for i in members]  # vision features fill their slots in row order
    for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [getattr(r, name) for r in laid_out if getattr(r, name) is not None]
        vision[name] = torch.cat(parts) if parts else None
    return TTEBatch(input_ids=input_ids, position_ids=positions, seq_ids=seq_ids, token_types=types,
                    emb_index=torch.tensor(emb_index, dtype=torch.long),
                    cot_pred_index=torch.tensor([j for part in cot_pred for j in part], dtype=torch.long),
                    cot_targets=torch.tensor([t for part in cot_tgt for t in part], dtype=torch.long), **vision)


def _fill_rows(lengths: list[int]) -> list[list[int]]:
    """Sample indices per row: first fit, longest first, into rows as long as the longest sample. Rows come in
    the order they were opened (longest sample first), the samples within a row in record order; callers read
    outputs through ``emb_index`` / ``cot_pred_index``, which follow the layout."""
    width, rows, free = max(lengths), [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if at is None:
            rows.append([])
            free.append(width)
            at = len(rows) - 1
        rows[at].append(i)
        free[at] -= lengths[i]
    return [sorted(members) for members in rows]
