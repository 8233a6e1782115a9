"""MTEB 2.x: ``TTEFlashMTEB``, an encoder (``mteb.models.EncoderProtocol``) for text, image, video and
fused inputs, and the ``ModelMeta`` that lets ``mteb.get_model`` load it.

    import mteb
    from tte_flash.integrations.mteb import TTEFlashMTEB, register
    meta = register("ckpt")                    # or a Hub id; mteb.get_model(meta.name) now loads it
    encoder = mteb.get_model(meta.name)        # == TTEFlashMTEB("ckpt") with the full ModelMeta
    mteb.evaluate(encoder, mteb.get_tasks(tasks=[...]))

mteb resolves a name through its registry (``mteb.models.model_implementations.MODEL_REGISTRY``,
built from the ``ModelMeta`` objects shipped with mteb); a name it does not know is read from the Hub
as a sentence-transformers model (``ModelMeta.from_hub``). :func:`register` adds this model's
``ModelMeta`` (``loader=TTEFlashMTEB``, license, languages, parameters, modalities, citation) to that
registry for the running process: there is no public registration API in mteb 2.26 (and its CLI
neither loads a local folder nor a plugin), so ``mteb run`` does not see a registered model.

mteb's extras: before loading a model, mteb checks that the extras of the modalities it declares are
installed (``image``: torchvision, ``video``: torchcodec), for models that read pixels with them. This
model needs neither (images are PIL, a tte-flash dependency; videos arrive as decoded frames, a torchcodec
decoder duck-typed, tensors or PIL lists), so its ``ModelMeta`` (:class:`TTEFlashModelMeta`) checks only
its own ``extra_requirements_groups``: ``mteb.get_model`` works on a plain ``pip install 'tte-flash[mteb]'``
with CPU torch. Reading a video task's data still needs torchcodec (``datasets`` decodes with it).

Each MTEB batch (a dict of columns) becomes one TTE-Flash input per row: ``text`` (or ``query``/
``title``+``body``), ``image``, ``video`` (torchcodec decoder, frame tensor, list of PIL images, or a
path) and ``instruction``. Role: ``prompt_type="document"`` (the corpus side of retrieval) embeds with
no think tokens and no instruction (as mteb's GME wrapper does); queries and symmetric tasks
(classification, clustering, STS: ``prompt_type`` None) embed with ``think_tokens`` (default
``config.default_think_tokens``) and the task's instruction (``get_instruction``) unless the batch has
one, as MMEB treats those inputs as queries.

The sentence-transformers route: :func:`sentence_transformer_encoder` wraps a ``SentenceTransformer``
of this model for mteb with its image and video modalities (mteb's own wrapper of an in-memory
``SentenceTransformer`` declares text only) and the same roles.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from mteb.abstasks.task_metadata import TaskType
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta
from mteb.types import PromptType
from PIL import Image

from ..card import CITATION, DEFAULT_LANGUAGES, DEFAULT_LICENSE, hub_id, parameter_count
from ..configuration import TTEFlashConfig
from ..modeling import TTEFlashModel
from .st_files import DOCUMENT_PROMPT, PROMPTS, QUERY_PROMPT

class TTEFlashModelMeta(ModelMeta):
    """mteb's ``ModelMeta`` that does not require mteb's image/video extras (torchvision, torchcodec) to load
    the model: TTE-Flash reads neither with them (module docstring). Explicit ``extra_requirements_groups``
    are still checked."""

    def _resolve_extras_groups(self) -> list[str]:
        return list(self.extra_requirements_groups or [])


DOCUMENT_TYPES = {PromptType.document} | ({PromptType.passage} if hasattr(PromptType, "passage") else set())
MTEB_MODALITIES = ["text", "image", "video"]  # what mteb calls them; "message" is a sentence-transformers input form


class TTEFlashMTEB(AbsEncoder):
    """MTEB encoder around a :class:`TTEFlashModel` (or a checkpoint path / Hub id)."""

    def __init__(self, model_name: str | TTEFlashModel, revision: str | None = None, *, path: str | None = None,
                 device: str | None = None, think_tokens: int | None = None, use_task_instructions: bool = True,
                 **kwargs):
        """``model_name``: a loaded model, a checkpoint directory or a Hub id; ``path`` (what
        :func:`register` passes for a local checkpoint): load from there, ``model_name`` only names it.
        Other keyword arguments (``mteb.get_model(name, **kwargs)`` passes them here) are refused, so a
        misspelt option is an error rather than ignored; ``embed_dim`` is accepted when it is the model's."""
        embed_dim = kwargs.pop("embed_dim", None)
        if kwargs:
            raise TypeError(f"TTEFlashMTEB got unknown options {sorted(kwargs)}; it takes path, device, "
                            "think_tokens, use_task_instructions")
        if isinstance(model_name, TTEFlashModel):
            self.model = model_name
            self.mteb_model_meta = model_meta(model=model_name)
        else:
            self.model = TTEFlashModel.from_pretrained(path) if path else \
                TTEFlashModel.from_pretrained(model_name, revision=revision)
            self.mteb_model_meta = model_meta(path or model_name, revision, model=self.model,
                                              name=model_name if path else None)
        if embed_dim is not None and embed_dim != self.model.config.text_config.hidden_size:
            raise ValueError(f"embed_dim={embed_dim}: this model embeds in {self.model.config.text_config.hidden_size} "
                             "dimensions only")
        if device is not None:
            self.model.to(device)
        self.think_tokens = self.model.config.default_think_tokens if think_tokens is None else think_tokens
        self.model._check_think_tokens(self.think_tokens)
        self.use_task_instructions = use_task_instructions

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs) -> np.ndarray:
        is_document = prompt_type in DOCUMENT_TYPES
        think_tokens = 0 if is_document else self.think_tokens
        instruction = None if is_document else self._instruction(task_metadata, prompt_type)
        batch_size = kwargs.get("batch_size", 32)
        chunks = [self.model.encode(batch_items(batch, instruction, use_batch_instruction=not is_document),
                                    think_tokens=think_tokens, batch_size=batch_size, show_progress_bar=False)
                  for batch in inputs]
        hidden = self.model.config.text_config.hidden_size
        return np.concatenate(chunks) if chunks else np.zeros((0, hidden), dtype=np.float32)

    def _instruction(self, task_metadata, prompt_type) -> str | None:
        if not self.use_task_instructions:
            return None
        try:
            instruction = self.get_instruction(task_metadata, prompt_type)
        except Exception:  # older/newer AbsEncoder without this helper, or no prompt for this task
            return None
        if isinstance(instruction, dict):  # per-role prompts and no role (a symmetric task): the query's
            instruction = instruction.get(PromptType.query.value)
        return instruction if isinstance(instruction, str) and instruction else None


def batch_items(batch: dict, instruction: str | None = None, *, use_batch_instruction: bool = True) -> list[dict]:
    """One TTE-Flash input dict per row of an MTEB batch (dict of columns); a row's own ``instruction``
    column wins over ``instruction`` unless ``use_batch_instruction`` is off (documents)."""
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
        row_instruction = ((batch.get("instruction") or [None] * n)[i] if use_batch_instruction else None) \
            or instruction
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


def model_meta(source: str | None = None, revision: str | None = None, *, model: TTEFlashModel | None = None,
               name: str | None = None, license: str | None = None, languages: list[str] | None = None,
               training_datasets: set[str] | None = None, **overrides) -> ModelMeta:
    """mteb's ``ModelMeta`` for a TTE-Flash checkpoint (directory or Hub id) or a loaded ``model``.

    ``loader`` is :class:`TTEFlashMTEB`. Read from the checkpoint: embedding size, max tokens, parameter
    count and size (safetensors headers, nothing loaded), and from its model card (``README.md``) the
    license, languages and ``base_model``; else the card's defaults (``tte_flash.card``). ``name``:
    the Hub id, else ``tte-flash/<directory name>``. ``public_training_data``: the card's ``datasets``.
    ``revision`` of a local checkpoint: a digest of its config and weight files (size, mtime), so
    mteb's result cache tells retrained weights apart.
    ``training_datasets``: the mteb task names the training data overlaps (``set()``: none, the model
    is zero-shot on all; None: unknown), as mteb defines the field; not guessed from file names.
    """
    if source is None and model is None:
        raise ValueError("model_meta needs a checkpoint (directory or Hub id) or a loaded model")
    config = model.config if model is not None else _load_config(source, revision)
    local = source is not None and Path(source).is_dir()
    repo_id = None if local or source is None else hub_id(source)
    card = _card_data(source) if source is not None else {}
    weights = _weights_info(Path(source)) if local else {}
    if model is not None:
        weights["n_parameters"] = sum(p.numel() for p in model.parameters())
    name = name or repo_id or f"tte-flash/{Path(source).name if source else 'in-memory'}"
    if local and revision is None:
        revision = _local_revision(Path(source))
    language_codes = languages or card.get("language") or DEFAULT_LANGUAGES
    base_model = card.get("base_model") or hub_id(getattr(config, "backbone_name_or_path", None))
    fields = dict(
        loader=TTEFlashMTEB, loader_kwargs={"path": str(Path(source).resolve())} if local else {},
        name=name, revision=revision or ("in-memory" if source is None else None), release_date=None,
        languages=_iso_languages(language_codes), n_parameters=weights.get("n_parameters"),
        memory_usage_mb=weights.get("memory_usage_mb"), max_tokens=_max_tokens(config),
        embed_dim=config.text_config.hidden_size, license=license or card.get("license") or DEFAULT_LICENSE,
        open_weights=True, public_training_code=None, public_training_data=", ".join(
            f"https://huggingface.co/datasets/{d}" for d in card.get("datasets") or []) or None,
        framework=["PyTorch", "Sentence Transformers"],
        reference=f"https://huggingface.co/{repo_id}" if repo_id else None,
        similarity_fn_name="cosine", use_instructions=True, training_datasets=training_datasets,
        adapted_from=base_model[0] if isinstance(base_model, list) else base_model,
        modalities=list(MTEB_MODALITIES), model_type=["dense"], citation=CITATION, **overrides)
    accepted = set(getattr(TTEFlashModelMeta, "model_fields", fields))
    return TTEFlashModelMeta(**{k: v for k, v in fields.items() if k in accepted})


def register(source: str, revision: str | None = None, **kwargs) -> ModelMeta:
    """Add the ``ModelMeta`` of ``source`` (see :func:`model_meta`) to mteb's model registry, so that
    ``mteb.get_model(meta.name)`` and ``mteb.get_model_meta(meta.name)`` find it in this process."""
    from mteb.models.model_implementations import MODEL_REGISTRY  # the dict mteb.get_model_meta reads
    meta = model_meta(source, revision, **kwargs)
    MODEL_REGISTRY[meta.name] = meta
    return meta


def sentence_transformer_encoder(model, **kwargs):
    """mteb's ``SentenceTransformerEncoderWrapper`` around a ``SentenceTransformer`` of this model,
    declaring the modalities the model supports (mteb 2.26 declares text only for an in-memory
    ``SentenceTransformer``, and refuses image tasks) and mapping every task type to a role: retrieval
    queries and symmetric tasks (``prompt_type`` None: classification, clustering, STS) embed as
    queries (think tokens), retrieval documents as documents. Task instructions are not used on this
    route (mteb passes only prompts to sentence-transformers)."""
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper
    if type(model[0]).__name__ != "TTEFlashST":  # the package's class or a remote-code copy of it
        raise ValueError(f"sentence_transformer_encoder wraps a SentenceTransformer of a TTE-Flash model; this one's "
                         f"first module is {type(model[0]).__name__}")
    wrapper = SentenceTransformerEncoderWrapper(model, **kwargs)
    supported = [m for m in ("text", "image", "audio", "video") if m in getattr(model, "modalities", MTEB_MODALITIES)]
    wrapper.mteb_model_meta = wrapper.mteb_model_meta.model_copy(update={
        "modalities": supported, "citation": CITATION, "use_instructions": False})
    roles = {f"{task_type}-{role}": prompt for task_type in get_args(TaskType)
             for role, prompt in (("query", QUERY_PROMPT), ("document", DOCUMENT_PROMPT))}
    wrapper.model_prompts = {**PROMPTS, **roles, **{t: QUERY_PROMPT for t in get_args(TaskType)}}
    return wrapper


def _load_config(source: str, revision: str | None) -> TTEFlashConfig:
    try:
        config_dict, _ = TTEFlashConfig.get_config_dict(source, revision=revision)
    except OSError as err:
        raise FileNotFoundError(f"no TTE-Flash checkpoint at {source!r}: {str(err).splitlines()[0]}") from None
    if config_dict.get("model_type") is None:
        raise FileNotFoundError(f"no TTE-Flash checkpoint at {source!r}: no config.json with a model_type there")
    if config_dict.get("model_type") != TTEFlashConfig.model_type:
        raise ValueError(f"{source} is a {config_dict.get('model_type')!r} checkpoint, not a TTE-Flash "
                         f"({TTEFlashConfig.model_type!r}) one")
    return TTEFlashConfig.from_dict(config_dict)


def _card_data(source: str) -> dict:
    """The model card's metadata (README.md of a directory, else of the Hub repo), {} when there is none."""
    from huggingface_hub import ModelCard
    path = Path(source) / "README.md"
    if Path(source).is_dir():
        if not path.is_file():
            return {}
        try:
            return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
        except Exception as err:  # a YAML error: the card's license and languages cannot be read
            raise ValueError(f"{path}: the model card's metadata does not parse ({err}); fix it or "
                             f"regenerate it with `tte-flash card {source} --force`") from None
    try:
        return ModelCard.load(source, ignore_metadata_errors=True).data.to_dict()
    except Exception as err:  # no card on the Hub, or offline
        warnings.warn(f"mteb ModelMeta of {source}: no model card read ({type(err).__name__}); license and "
                      "languages are the tte-flash defaults, pass license=/languages= if they differ", stacklevel=3)
        return {}


def _weights_info(directory: Path) -> dict:
    """Parameter count and size in MiB from the safetensors headers (nothing is loaded)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return {}
    return {"n_parameters": parameter_count(directory),
            "memory_usage_mb": round(sum(f.stat().st_size for f in files) / 2**20, 2)}


def _local_revision(directory: Path) -> str:
    digest = hashlib.sha1((directory / "config.json").read_bytes())
    for file in sorted(directory.glob("*.safetensors")):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"local-{digest.hexdigest()[:12]}"


def _iso_languages(codes) -> list[str] | None:
    """Hub language codes ("en") as mteb's ISO 639-3 + script codes ("eng-Latn")."""
    from mteb.languages.iso_mappings import _hf_langs_to_iso_lang_scripts  # what ModelMeta.from_hub uses
    return _hf_langs_to_iso_lang_scripts([codes] if isinstance(codes, str) else list(codes))


def _max_tokens(config) -> int | None:
    """Query tokens before the think and ``<emb>`` tokens (``config.max_query_tokens``' rule)."""
    if config.max_query_tokens is not None:
        return config.max_query_tokens
    positions = getattr(config.text_config, "max_position_embeddings", None)
    return None if positions is None else positions - config.max_think_tokens - 1
