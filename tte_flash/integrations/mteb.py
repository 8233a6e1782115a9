"""MTEB 2.x: ``TTEFlashMTEB``, an encoder (``mteb.models.EncoderProtocol``) for text, image, video and
fused inputs.

    import mteb
    from tte_flash.integrations.mteb import TTEFlashMTEB
    encoder = TTEFlashMTEB("ckpt")             # or TTEFlashMTEB(model) for a loaded TTEFlashModel
    mteb.evaluate(encoder, mteb.get_tasks(tasks=[...]))

Each MTEB batch (a dict of columns) becomes one TTE-Flash input per row: ``text`` (or ``query``/
``title``+``body``), ``image``, ``video`` (torchcodec decoder, frame tensor, list of PIL images, or a
path) and ``instruction``. Role: ``prompt_type="document"`` (the corpus side of retrieval) embeds with
no think tokens; queries and symmetric tasks (classification, clustering, STS: ``prompt_type`` None)
embed with ``think_tokens`` (default ``config.default_think_tokens``), as MMEB treats those inputs as
queries. The task's instruction (``get_instruction``) is used when the batch has none.
"""
from __future__ import annotations

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta
from mteb.types import PromptType
from PIL import Image

from ..modeling import TTEFlashModel

DOCUMENT_TYPES = {PromptType.document} | ({PromptType.passage} if hasattr(PromptType, "passage") else set())


class TTEFlashMTEB(AbsEncoder):
    """MTEB encoder around a :class:`TTEFlashModel` (or a checkpoint path / Hub id)."""

    def __init__(self, model_name: str | TTEFlashModel, revision: str | None = None, *, device: str | None = None,
                 think_tokens: int | None = None, use_task_instructions: bool = True, **kwargs):
        if isinstance(model_name, TTEFlashModel):
            self.model, name = model_name, "tte-flash/in-memory"
        else:
            self.model, name = TTEFlashModel.from_pretrained(model_name, revision=revision), str(model_name)
        if device is not None:
            self.model.to(device)
        self.think_tokens = self.model.config.default_think_tokens if think_tokens is None else think_tokens
        self.model._check_think_tokens(self.think_tokens)
        self.use_task_instructions = use_task_instructions
        self.mteb_model_meta = _model_meta(name if "/" in name else f"tte-flash/{name}", revision, self.model)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs) -> np.ndarray:
        is_document = prompt_type in DOCUMENT_TYPES
        think_tokens = 0 if is_document else self.think_tokens
        instruction = self._instruction(task_metadata, prompt_type)
        batch_size = kwargs.get("batch_size", 32)
        chunks = [self.model.encode(batch_items(batch, instruction), think_tokens=think_tokens,
                                    batch_size=batch_size, show_progress_bar=False)
                  for batch in inputs]
        hidden = self.model.config.text_config.hidden_size
        return np.concatenate(chunks) if chunks else np.zeros((0, hidden), dtype=np.float32)

    def _instruction(self, task_metadata, prompt_type) -> str | None:
        if not self.use_task_instructions:
            return None
        try:
            return self.get_instruction(task_metadata, prompt_type) or None
        except Exception:  # older/newer AbsEncoder without this helper, or no prompt for this task
            return None


def batch_items(batch: dict, instruction: str | None = None) -> list[dict]:
    """One TTE-Flash input dict per row of an MTEB batch (dict of columns)."""
    n = len(next(v for v in batch.values() if hasattr(v, "__len__")))
    items = []
    for i in range(n):
        item = {}
        text = _text(batch, i)
        if text:
            item["text"] = text
        if batch.get("image") is not None and batch["image"][i] is not None:
            item["image"] = _image(batch["image"][i])
        if batch.get("video") is not None and batch["video"][i] is not None:
            item["video"] = video_frames(batch["video"][i])
        row_instruction = (batch.get("instruction") or [None] * n)[i] or instruction
        if row_instruction:
            item["instruction"] = row_instruction
        items.append(item)
    return items


def _text(batch: dict, i: int) -> str | None:
    for key in ("text", "query"):
        if batch.get(key) is not None and batch[key][i]:
            return batch[key][i]
    parts = [batch[key][i] for key in ("title", "body") if batch.get(key) is not None and batch[key][i]]
    return " ".join(parts) or None


def _image(image):
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        return _tensor_to_pil(image)
    return image  # a path


def video_frames(video) -> list[Image.Image] | str:
    """Frames of an MTEB video cell as PIL images: a torchcodec ``VideoDecoder`` (all frames; the model
    samples ``config.video_max_frames``), a (T, C, H, W) or (T, H, W, C) tensor or array, or a list."""
    if isinstance(video, (str, list, tuple)):
        return [_image(f) for f in video] if isinstance(video, (list, tuple)) else video
    if hasattr(video, "get_frames_in_range") and hasattr(video, "metadata"):  # torchcodec.decoders.VideoDecoder
        video = video.get_frames_in_range(0, len(video)).data  # (T, C, H, W) uint8
    frames = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video)
    return [_tensor_to_pil(f) for f in frames]


def _tensor_to_pil(frame: torch.Tensor) -> Image.Image:
    frame = frame.detach().cpu()
    if frame.ndim == 3 and frame.shape[0] in (1, 3) and frame.shape[-1] not in (1, 3):
        frame = frame.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if frame.is_floating_point():
        frame = (frame.clamp(0, 1) * 255).round()
    array = frame.to(torch.uint8).numpy()
    return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).convert("RGB")


def _model_meta(name: str, revision: str | None, model: TTEFlashModel) -> ModelMeta:
    fields = dict(name=name, revision=revision or "local", release_date=None, languages=None,
                  loader=None, n_parameters=sum(p.numel() for p in model.parameters()), memory_usage_mb=None,
                  max_tokens=None, embed_dim=model.config.text_config.hidden_size, license=None,
                  open_weights=True, public_training_code=None, public_training_data=None, framework=["PyTorch"],
                  reference=None, similarity_fn_name="cosine", use_instructions=True, training_datasets=None,
                  modalities=["text", "image", "video"])
    accepted = set(getattr(ModelMeta, "model_fields", fields))
    return ModelMeta(**{k: v for k, v in fields.items() if k in accepted})
