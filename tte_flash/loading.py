"""Building, loading and saving a :class:`~tte_flash.modeling.TTEFlashModel` (mixed into the model class).

* :meth:`LoadingMixin.from_preset` - a named model shipped in ``tte_flash/presets`` (offline);
* :meth:`LoadingMixin.from_spec` - a random model from a preset-style dict and a tokenizer;
* :meth:`LoadingMixin.from_backbone` - a Qwen2-VL checkpoint turned into a TTE-Flash model;
* :meth:`LoadingMixin.from_pretrained` / :meth:`LoadingMixin.save_pretrained` / :meth:`LoadingMixin.push_to_hub`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedConfig

from .configuration import TTEFlashConfig
from .processing import TTEProcessor, make_image_processor
from .tokenization import add_tte_tokens, build_byte_tokenizer

PRESET_DIR = Path(__file__).parent / "presets"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


class LoadingMixin:
    """Constructors and persistence; placed before ``Qwen2VLForConditionalGeneration`` in the model's bases,
    so ``super().from_pretrained`` here is transformers' own."""

    @classmethod
    def from_preset(cls, name: str = "tiny", **overrides):
        """A named model, offline: ``tiny-instruct`` is pretrained (the CPU world's backbone, loaded through
        :meth:`from_backbone` like Qwen2-VL-2B-Instruct); ``tiny``, ``small`` and ``qwen2-vl-2b`` are
        randomly initialised architectures.

        ``overrides`` set TTEFlashConfig fields (e.g. ``max_think_tokens=64``, ``think_bidirectional=True``).
        """
        path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"unknown preset {name!r}; available: {available_presets()}")
        spec = json.loads(path.read_text())
        spec.pop("_comment", None)
        backbone = spec.pop("backbone", None)
        if backbone is not None:  # a pretrained preset: a Qwen2-VL directory shipped in the package
            if not (PRESET_DIR / backbone / "model.safetensors").is_file():
                raise FileNotFoundError(f"preset {name!r}: its weights are missing from {PRESET_DIR / backbone} "
                                        "(rebuild them with training/pretrain.py, see training/README.md)")
            return cls.from_backbone(PRESET_DIR / backbone, **{**spec, **overrides})
        spec.update(overrides)
        return cls.from_spec(spec, build_byte_tokenizer())

    @classmethod
    def from_spec(cls, spec: dict, tokenizer):
        """A randomly initialised model from a preset-style dict (``text_config``, ``vision_config`` and
        TTEFlashConfig fields) and a tokenizer, to which the think tokens and ``<emb>`` are added."""
        spec = dict(spec)
        think_ids, emb_id = add_tte_tokens(tokenizer, spec.get("max_think_tokens", 32))
        spec.setdefault("default_think_tokens", min(16, spec.get("max_think_tokens", 32)))
        text = dict(spec.pop("text_config"))
        text.setdefault("vocab_size", 64 * -(-len(tokenizer) // 64))
        text.update(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        token_ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        config = TTEFlashConfig(text_config=text, **token_ids, think_token_ids=think_ids, emb_token_id=emb_id, **spec)
        model = cls(config)
        model.processor = TTEProcessor(tokenizer, model._image_processor(), config)
        return model

    @classmethod
    def from_backbone(cls, path: str | os.PathLike, max_think_tokens: int = 32, **kwargs):
        """Turn a Qwen2-VL checkpoint (directory or Hub id) into a TTE-Flash model.

        Adds ``max_think_tokens`` think tokens and ``<emb>`` to its tokenizer, with embedding rows
        initialised near the mean of the existing rows. ``kwargs``: TTEFlashConfig fields
        (``think_bidirectional``, ``embedding_layer``, ...) and ``from_pretrained`` loading options
        (``torch_dtype``, ``device_map``, ...).
        """
        path = os.fspath(path)
        config_dict = _read_config_dict(path)
        if config_dict.get("model_type") != "qwen2_vl":
            raise ValueError(f"{path} is a {config_dict.get('model_type')!r} checkpoint; from_backbone needs a "
                             "Qwen2-VL ('qwen2_vl') checkpoint")
        tte_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in TTEFlashConfig.__dataclass_fields__}
        tokenizer = AutoTokenizer.from_pretrained(path)
        original_vocab = len(tokenizer)
        think_ids, emb_id = add_tte_tokens(tokenizer, max_think_tokens)
        config_dict = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures")}
        tte_fields.setdefault("default_think_tokens", min(16, max_think_tokens))
        tte_fields.setdefault("backbone_name_or_path", path)
        config = TTEFlashConfig(**{**config_dict, **tte_fields, "max_think_tokens": max_think_tokens,
                                   "think_token_ids": think_ids, "emb_token_id": emb_id})
        _check_local_weights(path, kwargs.get("use_safetensors"))
        with _weight_errors(path):
            model = super().from_pretrained(path, config=config, **kwargs)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            model.config.text_config.vocab_size = len(tokenizer)
        # only the rows of tokens this call added: a backbone pretrained with think tokens (pause-pretraining,
        # training/pretrain.py --pause_tokens) keeps the rows it learnt
        model._init_new_token_rows([i for i in think_ids + [emb_id] if i >= original_vocab], original_vocab)
        model._use_tte_attention()
        model.processor = TTEProcessor(tokenizer, model._image_processor(), model.config)
        return model

    @torch.no_grad()
    def _init_new_token_rows(self, token_ids: list[int], n_existing: int):
        generator = torch.Generator().manual_seed(0)
        for matrix in {id(m): m for m in (self.get_input_embeddings().weight, self.get_output_embeddings().weight)}.values():
            existing = matrix[:n_existing].float()
            noise = torch.randn(len(token_ids), matrix.shape[1], generator=generator) * existing.std() * 0.1
            matrix[token_ids] = (existing.mean(0) + noise.to(matrix.device)).to(matrix.dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a saved TTE-Flash checkpoint (directory or Hub id) with its tokenizer."""
        path = os.fspath(pretrained_model_name_or_path)
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        config_dict = _read_config_dict(path, **hub_kwargs)
        if config_dict.get("model_type") != TTEFlashConfig.model_type:
            hint = " (use TTEFlashModel.from_backbone for a Qwen2-VL backbone)" \
                if config_dict.get("model_type") == "qwen2_vl" else ""
            raise ValueError(f"{path} is a {config_dict.get('model_type')!r} checkpoint, not a TTE-Flash "
                             f"('tte_flash') checkpoint{hint}")
        _check_local_weights(path, kwargs.get("use_safetensors"))
        want_info = kwargs.pop("output_loading_info", False)
        with _weight_errors(path):
            model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys") or [])
        if missing:  # transformers would initialise them at random, with a log line only
            raise ValueError(f"{path}: the weights lack {len(missing)} tensor{'s' * (len(missing) > 1)} of the model "
                             f"(first: {', '.join(missing[:5])}); they would be random. The weights file is "
                             "incomplete or of another architecture")
        model._use_tte_attention()
        tokenizer = AutoTokenizer.from_pretrained(path, config=model.config, **hub_kwargs)
        check_tte_token_ids(model.config, tokenizer, model.get_input_embeddings().num_embeddings, path)
        model.processor = TTEProcessor(tokenizer, model._image_processor(), model.config)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, model_card: bool = True, **kwargs):
        """Save weights (safetensors), config, tokenizer, image processor and a model card (README.md,
        from the config and any result files in the directory; see ``tte_flash.card``)."""
        # Weights are saved in Qwen2-VL's original key layout, like transformers does for Qwen2-VL,
        # except for Trainer checkpoints (see tte_flash.training), whose resume loads keys as they are.
        kwargs.setdefault("save_original_format", getattr(self, "_save_original_format", True))
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.processor is not None:
            self.processor.tokenizer.save_pretrained(save_directory)
            self.processor.image_processor.save_pretrained(save_directory)
        if kwargs.get("is_main_process", True):
            from .integrations import write_integration_files  # remote code, sentence-transformers files
            write_integration_files(save_directory, self.config)
            if model_card:
                from .card import write_model_card
                write_model_card(save_directory, self.config)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload TTE-Flash model", results_dir=None, **kwargs):
        """Save (weights, processor, model card) and upload to the Hub. transformers' own push_to_hub
        would replace the generated card with a generic one, hence this override.
        ``results_dir``: a run directory whose result files (``tte_flash.card.RESULT_FILES``) go into the card."""
        import shutil
        import tempfile

        from huggingface_hub import HfApi

        from .card import RESULT_FILES, write_model_card
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            for name in RESULT_FILES.values():
                if results_dir is not None and (Path(results_dir) / name).is_file():
                    shutil.copy(Path(results_dir) / name, Path(tmp) / name)
            self.save_pretrained(tmp, model_card=False)
            write_model_card(tmp, self.config, model_id=repo_id, force=True)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, **kwargs)

    def _image_processor(self):
        return make_image_processor(self.config.image_min_pixels, self.config.image_max_pixels)


def _read_config_dict(path: str, **hub_kwargs) -> dict:
    """config.json of a local directory or Hub id, with a clear error when neither exists."""
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).suffix != ""
    if not Path(path).exists() and looks_local:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if Path(path).is_dir():
        return read_local_config(path)
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(path, **hub_kwargs)
    except OSError as err:
        raise FileNotFoundError(f"checkpoint not found: {path} (no such directory, and the Hub lookup failed: "
                                f"{str(err).splitlines()[0]})") from None
    return config_dict


def read_local_config(folder) -> dict:
    """The config.json of a local model folder as a dict: ``FileNotFoundError`` when the folder has none,
    ``ValueError`` naming the file when it is not a JSON object."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a saved model folder (a TTE-Flash checkpoint "
                                "or a Qwen2-VL backbone)")
    try:
        config_dict = json.loads(config_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{config_path} is not UTF-8 text (byte {err.start}): not a model config") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON (line {err.lineno}, column {err.colno}: "
                         f"{err.msg})") from None
    if not isinstance(config_dict, dict):
        raise ValueError(f"{config_path} holds a JSON {type(config_dict).__name__}, not an object: not a model config")
    return config_dict


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_local_weights(path: str, use_safetensors) -> None:
    """A local checkpoint folder must hold safetensors weights: a clear error for none, or for pickle files
    only (which can run code when loaded), unless the caller passed ``use_safetensors=False``."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise FileNotFoundError(f"{folder} has no weights: no model.safetensors (or sharded *.safetensors)")
    if use_safetensors is not False:
        raise ValueError(f"{folder} holds only pickle weights ({', '.join(pickles[:3])}), no model.safetensors: "
                         "TTE-Flash checkpoints are saved as safetensors, and a pickle can run code when loaded. "
                         "Convert it to safetensors, or pass use_safetensors=False to load it with torch's "
                         "weights-only unpickler")


class _weight_errors:
    """Turns an unreadable weights file (truncated or corrupt safetensors, a pickle the weights-only
    unpickler refuses) into a ``ValueError`` naming the checkpoint, instead of a deep traceback."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        import pickle

        from safetensors import SafetensorError
        if kind is None or not issubclass(kind, (SafetensorError, pickle.UnpicklingError, EOFError)):
            return False
        folder = Path(self.path)
        files = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", *PICKLE_SUFFIXES)) \
            if folder.is_dir() else []
        where = f"the weights of {self.path} ({', '.join(files) or 'weights file'})"
        if issubclass(kind, pickle.UnpicklingError):
            raise ValueError(f"refusing {where}: the pickle holds objects other than tensors, which torch's "
                             "weights-only unpickler does not load (loading them could run code)") from None
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), "no details")[:200]
        raise ValueError(f"cannot read {where}: truncated or corrupt ({type(err).__name__}: {reason})") from None


def check_tte_token_ids(config, tokenizer, vocab_rows: int, where: str) -> None:
    """``ValueError`` naming the config field when a think-token id or ``emb_token_id`` is outside the
    embedding matrix or names another token of the tokenizer (a config and tokenizer that disagree would
    otherwise embed with the wrong token, or fail at the first encode)."""
    from .tokenization import EMB_TOKEN, think_token
    if config.think_token_ids is None or config.emb_token_id is None:
        raise ValueError(f"{where}: config.json has no think_token_ids / emb_token_id: not a TTE-Flash checkpoint")
    fields = [(f"think_token_ids[{i}]", token_id, think_token(i)) for i, token_id in enumerate(config.think_token_ids)]
    for name, token_id, token in fields + [("emb_token_id", config.emb_token_id, EMB_TOKEN)]:
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab_rows:
            raise ValueError(f"{where}: config field {name}={token_id!r} is outside the vocabulary (ids 0 to "
                             f"{vocab_rows - 1})")
        actual = tokenizer.convert_ids_to_tokens(token_id)
        if actual != token:
            right = tokenizer.convert_tokens_to_ids(token)
            raise ValueError(f"{where}: config field {name}={token_id} is the token {actual!r}, not {token!r} "
                             f"(the tokenizer's id for it is {right}): config.json and the tokenizer disagree")
