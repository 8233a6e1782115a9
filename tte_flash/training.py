"""Joint CoT-reconstruction + contrastive training of a TTE-Flash model (DESIGN.md §5).

The machinery behind ``training/train.py`` (and ``tte-flash demo``): argument dataclasses, the
dataset, the ``Trainer`` subclass and ``main``.

    python training/train.py --model tiny --train_data data/train.jsonl --image_root data \\
        --output_dir runs/tiny --think_tokens 16 --cot_weight 1.0 --max_steps 500 \\
        --per_device_train_batch_size 32 --learning_rate 1e-3
    python training/train.py training/configs/tiny.yaml [--overrides ...]     # a recipe
    torchrun --nproc_per_node 8 training/train.py training/configs/qwen2-vl-2b.yaml ...

Arguments are Hugging Face dataclasses (``--output_dir`` and ``--output-dir`` both work); a YAML file
as the first argument (or ``--config FILE``) sets defaults that command-line flags override.
A ``transformers.Trainer`` subclass runs the loop, so DDP/FSDP/DeepSpeed (torchrun / accelerate
launch), checkpoints, ``--resume_from_checkpoint``, logging and progress bars come with it.
Each step is one packed forward over queries ``[query][think][emb][cot]`` and their targets.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, Trainer, TrainingArguments

from .collator import TrainCollator, curriculum_stage, with_trace
from .data import TRAIN_COLUMNS, load_rows, train_example
from .data_check import RowLocator, RowName, TrainingDataError, validate_rows
from .loading import read_local_config
from .modeling import TTEFlashModel, available_presets
from .objective import Objective

logger = logging.getLogger("tte_flash.train")
VALIDATE_CHOICES = ("open", "decode", "off")


@dataclass
class ModelArguments:
    model: str = field(default="tiny", metadata={"help": "a preset (tiny, small, qwen2-vl-2b), a TTE-Flash checkpoint "
                                                         "or a Qwen2-VL backbone directory"})
    max_think_tokens: int = field(default=32, metadata={"help": "think tokens to add (presets and backbones only)"})
    think_bidirectional: bool = field(default=False, metadata={"help": "think tokens attend both ways"})
    cot_sees_query: bool = field(default=True, metadata={"help": "COT tokens attend to the query"})
    embedding_layer: int = field(default=-1, metadata={"help": "-1 final layer, -k k-th layer from the end"})
    attn_backend: str | None = field(default=None, metadata={"help": "reference | triton (default: by device)"})
    freeze_vision: bool = field(default=False, metadata={"help": "do not train the vision tower"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) + the new token rows"})
    lora_r: int = 16
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    liger_kernels: bool = field(default=False, metadata={
        "help": "CUDA: Liger-Kernel's fused RMSNorm, SwiGLU, M-RoPE and LayerNorm in the model (pip install "
                "liger-kernel); the COT loss uses Liger's fused linear cross-entropy whenever it is installed"})


@dataclass
class DataArguments:
    train_data: list[str] = field(default_factory=list, metadata={"help": "JSONL/Parquet files, MMEB-train columns"})
    image_root: str | None = field(default=None, metadata={"help": "root that image paths are relative to"})
    allow_outside_image_root: bool = field(default=False, metadata={
        "help": "accept media paths outside --image_root (absolute paths, '..'); by default they are an error"})
    think_tokens: list[int] = field(default_factory=lambda: [16],
                                    metadata={"help": "think budgets; one is sampled per batch"})
    cot_weight: float = field(default=1.0, metadata={"help": "weight of the COT NLL; 0 disables the COT branch"})
    max_cot_tokens: int = field(default=256, metadata={"help": "traces are truncated to this many tokens"})
    hard_negatives: bool = field(default=True, metadata={"help": "use neg_text/neg_image_path as extra targets"})
    mask_duplicate_targets: bool = field(default=True, metadata={"help": "equal targets are not negatives"})
    temperature: float | None = field(default=None, metadata={"help": "InfoNCE temperature (default: config's)"})
    grad_cache: bool = field(default=False, metadata={"help": "gradient-cache mode: large contrastive batches "
                                                              "in chunks on one device"})
    grad_cache_chunk_size: int = field(default=8, metadata={"help": "examples per chunk in grad-cache mode"})
    packed: bool | None = field(default=None, metadata={"help": "padding-free packing (default: on for triton)"})
    think_warmup_steps: int = field(default=0, metadata={
        "help": "train the first N steps at K=0 (the think budgets apply after them): K new think tokens "
                "between a pretrained backbone's query and <emb> can collapse the embedder at the start"})
    think_warmup_accuracy: float | None = field(default=None, metadata={
        "help": "and after those steps, stay at K=0 until a logged in-batch contrastive accuracy reaches this "
                "(e.g. 0.5): the think tokens start once the embedder has left the collapsed start (with "
                "--distill_weight, the teacher's accuracy counts too: at K=0 the latent queries cannot reason)"})
    query_with_trace: bool = field(default=False, metadata={
        "help": "append each row's qry_cot to its query (the embedder of the explicit 'Think Then Embed' "
                "pipeline, evaluated with --mode explicit-cot --reasoner BACKBONE); implies no COT loss"})
    distill_weight: float = field(default=0.0, metadata={
        "help": "explicit-to-latent self-distillation: the same model embeds query + qry_cot at K=0 (the teacher, "
                "trained by InfoNCE too) and the latent <emb> is pulled toward it (no gradient to the teacher) with "
                "this weight; 0 turns it off"})
    distill_kind: str = field(default="cosine", metadata={
        "help": "cosine: 1 - cos(latent, teacher); kl: KL between the teacher's and the latent's in-batch score "
                "distributions", "choices": ["cosine", "kl"]})
    teacher_weight: float = field(default=1.0, metadata={
        "help": "weight of the teacher's own InfoNCE when --distill_weight > 0 (0: the teacher is not trained)"})
    on_nonfinite: str = field(default="stop", metadata={
        "help": "a non-finite (NaN/inf) loss or gradient: stop (an error before anything more is saved) or skip "
                "(that optimizer step makes no update; a warning, and `nonfinite_steps_skipped` in the log)",
        "choices": ["stop", "skip"]})
    curriculum_steps: list[int] = field(default_factory=list, metadata={
        "help": "explicit-to-latent curriculum: optimizer steps at which the next stage starts; before the first, "
                "queries carry their whole qry_cot; stage i of n drops the first i/n of its steps (sentences); "
                "from the last boundary on, none (the plain latent batch). E.g. --curriculum_steps 60 120 180"})
    validate_data: str = field(default="open", metadata={
        "help": "check every training row before the first step (column types, empty query/target, ragged "
                "negatives, media paths): open (each image's header and end, cheap), decode (every image's "
                "pixels), off (the first row only)", "choices": list(VALIDATE_CHOICES)})


class RowDataset(torch.utils.data.Dataset):
    """The rows of the training files, every one checked before training starts (``tte_flash.data_check``;
    ``validate``: "open" reads each image's header and end, "decode" every pixel, "off" checks the first
    row only). ``needs_trace``: the option that needs a qry_cot trace in every row, or None."""

    def __init__(self, paths, image_root, query_with_trace: bool = False, needs_trace: str | None = None,
                 validate: str = "open", allow_outside_root: bool = False):
        if not paths:
            raise ValueError("no training data: pass --train_data FILE [FILE ...] (JSONL or Parquet)")
        if validate not in VALIDATE_CHOICES:
            raise ValueError(f"--validate_data must be one of {VALIDATE_CHOICES}, got {validate!r}")
        self.rows, self.locator = [], RowLocator()
        for path in paths:
            self.locator.add(path, len(self.rows))
            self.rows += _load_rows(path)
        self.image_root, self.query_with_trace = image_root, query_with_trace
        self.allow_outside_root = allow_outside_root
        if query_with_trace:
            needs_trace = "--query_with_trace"
        rows = self.rows if validate != "off" else self.rows[:1]
        validate_rows(rows, self.locator.locate, image_root, decode=validate == "decode", needs_trace=needs_trace,
                      allow_outside_root=allow_outside_root)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        example = train_example(self.rows[index], self.image_root, self.allow_outside_root)
        if self.query_with_trace:  # the trace follows the query text directly, as a generated one does
            example["query"] = with_trace(example["query"], example["cot"])
            example["cot"] = None
        return {**example, "index": index, "where": RowName(self.locator.locate, index)}


def _load_rows(path) -> list[dict]:
    try:
        return load_rows(path, TRAIN_COLUMNS)
    except UnicodeDecodeError as err:  # a reader that decodes the whole file: name the line
        newline, whole_file = b"\n", len(err.object) == os.path.getsize(path)
        line = f" line {err.object.count(newline, 0, err.start) + 1}," if whole_file else ""
        raise TrainingDataError(f"{path}{line} byte {err.start}: not UTF-8 text ({err.reason})") from None


class CollapseMonitor:
    """Warns when the contrastive loss sits at the loss of uniform scores, ln(number of targets).

    That is the signature of a collapsed embedder: every query and document maps to (nearly) one
    vector, a stationary point of InfoNCE (training/README.md). ``update`` takes one logged
    (contrastive_loss, uniform_loss) pair and returns the warning text the first time the loss has
    been within ``tolerance`` (relative) of uniform for ``patience`` consecutive logs, else None.
    """

    def __init__(self, patience: int = 5, tolerance: float = 0.02):
        self.patience, self.tolerance = patience, tolerance
        self.streak, self.fired = 0, False

    def update(self, contrastive_loss: float, uniform_loss: float) -> str | None:
        at_uniform = uniform_loss > 0 and abs(contrastive_loss - uniform_loss) <= uniform_loss * self.tolerance
        self.streak = self.streak + 1 if at_uniform else 0
        if self.streak < self.patience or self.fired:
            return None
        self.fired = True
        return (f"the contrastive loss has sat at {contrastive_loss:.3f}, the loss of uniform scores "
                f"(ln of the {math.exp(uniform_loss):.0f} targets per query = {uniform_loss:.3f}), for "
                f"{self.streak} logging steps: the embedder has likely collapsed (every input maps to nearly "
                "the same vector) and is not learning the task. Try: a backbone that can already read the "
                "inputs (--model tiny-instruct on a CPU, a pretrained Qwen2-VL on a GPU), a lower learning "
                "rate, an easier curriculum first; check with training/embedding_spread.py.")


class NonFiniteTrainingError(FloatingPointError):
    """Training produced a NaN/inf loss, gradient or weight; the run stopped before saving it."""


def check_finite_state(state_dict, where: str) -> None:
    """Raise :class:`NonFiniteTrainingError` naming the tensors of ``state_dict`` that hold NaN/inf."""
    bad = [name for name, tensor in state_dict.items()
           if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise NonFiniteTrainingError(
            f"refusing to save {where}: {len(bad)} of {len(state_dict)} tensors hold NaN or inf (first: "
            f"{', '.join(bad[:5])}). The run diverged; lower --learning_rate, check --cot_weight/--temperature, "
            "or resume from an earlier checkpoint.")


class TTETrainer(Trainer):
    """Trainer whose loss is InfoNCE + cot_weight * COT NLL on one packed forward per batch."""

    def __init__(self, *args, objective: Objective, grad_cache_chunk_size: int | None = None,
                 think_warmup_steps: int = 0, think_warmup_accuracy: float | None = None,
                 curriculum_steps=(), on_nonfinite: str = "stop", **kwargs):
        super().__init__(*args, **kwargs)
        self.curriculum_steps = list(curriculum_steps)
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite, self.nonfinite_skipped = on_nonfinite, 0
        self.objective, self.grad_cache_chunk_size = objective, grad_cache_chunk_size
        self.think_warmup_steps, self.think_warmup_accuracy = think_warmup_steps, think_warmup_accuracy
        self.think_from_step = None if think_warmup_accuracy is not None else think_warmup_steps
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean: Trainer scales it for GA
        self._tte_logs: dict[str, list[float]] = {}
        self.collapse_monitor = CollapseMonitor()

    def _train_batch(self, inputs):
        """The collated batch, at K=0 during the think warm-up (the step counter survives a resume)."""
        batch = inputs["train_batch"]
        if self.think_from_step is None:  # a resumed run: the switch is in the log history
            self.think_from_step = next((int(e["think_tokens_from_step"]) for e in self.state.log_history
                                         if "think_tokens_from_step" in e), None)
        if batch.think_tokens and (self.think_from_step is None or self.state.global_step < self.think_from_step):
            batch = replace(batch, think_tokens=0)
        if self.curriculum_steps:  # the step counter survives a resume, so the stage does too
            batch = batch.at_stage(curriculum_stage(self.state.global_step, self.curriculum_steps))
        return batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, stats = self.objective.loss(model, self._train_batch(inputs))
        self._check_loss(loss, stats)
        self._record(stats)
        return (loss, stats) if return_outputs else loss

    def _check_loss(self, loss, stats):
        if self.on_nonfinite == "stop" and not bool(torch.isfinite(loss.detach()).all()):
            parts = ", ".join(f"{k} {float(v):.4g}" for k, v in stats.items() if k.endswith("_loss"))
            raise NonFiniteTrainingError(
                f"non-finite loss {float(loss.detach()):.4g} at step {self.state.global_step + 1} ({parts}); stopped before "
                "the update, nothing more is saved. Lower --learning_rate, check --cot_weight/--temperature and the "
                "data, or pass --on_nonfinite skip to skip such steps.")

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm, checked: a non-finite one stops the run or skips the update."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            step = self.state.global_step + 1
            if self.on_nonfinite == "stop":
                raise NonFiniteTrainingError(
                    f"non-finite gradient norm ({float(grad_norm)}) at step {step}; stopped before the update, "
                    "nothing more is saved. Lower --learning_rate or pass --on_nonfinite skip to skip such steps.")
            for parameter in model.parameters():  # the optimizer skips parameters without a gradient
                parameter.grad = None
            self.nonfinite_skipped += 1
            logger.warning("non-finite gradient norm at step %d: the update is skipped (%d so far)", step,
                           self.nonfinite_skipped)
        return grad_norm

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.grad_cache_chunk_size:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        scale = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        with self.compute_loss_context_manager():
            loss, stats = self.objective.grad_cache_backward(
                model, self._train_batch(inputs), self.grad_cache_chunk_size, backward=self.accelerator.backward,
                no_sync=lambda: self.accelerator.no_sync(model), scale=scale)
        self._record(stats)
        return loss * scale

    def _save(self, output_dir=None, state_dict=None):
        # Trainer's resume loads a checkpoint's state dict as is: keep the model's own key names there.
        model = self.accelerator.unwrap_model(self.model)
        check_finite_state(state_dict if state_dict is not None else model.state_dict(),
                           f"the checkpoint {output_dir or self.args.output_dir}")
        model._save_original_format = False
        try:
            super()._save(output_dir, state_dict)
        finally:
            model._save_original_format = True

    # -- logging ------------------------------------------------------------------------------
    def _record(self, stats):
        for name, value in stats.items():
            self._tte_logs.setdefault(name, []).append(float(value))

    def log(self, logs, *args, **kwargs):
        for name, values in self._tte_logs.items():
            if values:
                logs[name] = round(sum(values) / len(values), 4)
        self._tte_logs = {}
        if self.nonfinite_skipped:
            logs["nonfinite_steps_skipped"] = float(self.nonfinite_skipped)
        # the embedder has left the collapsed start when it ranks well: the latent queries', or with
        # distillation the teacher's (the same embedder reading query + trace; at K=0 the latent one cannot)
        accuracy = max(logs.get("contrastive_accuracy", 0.0), logs.get("teacher_contrastive_accuracy", 0.0))
        if self.think_from_step is None and self.state.global_step >= self.think_warmup_steps \
                and accuracy >= self.think_warmup_accuracy:
            self.think_from_step = self.state.global_step  # the next batches use the think budgets
            logs["think_tokens_from_step"] = float(self.think_from_step)
            if self.is_world_process_zero():
                logger.info("in-batch contrastive accuracy %.3f >= %.3f at step %d: think tokens on from here",
                            accuracy, self.think_warmup_accuracy, self.state.global_step)
        if "contrastive_loss" in logs and "uniform_loss" in logs:
            warning = self.collapse_monitor.update(logs["contrastive_loss"], logs["uniform_loss"])
            if warning and self.is_world_process_zero():
                logger.warning(warning)
                logs["collapse_warning"] = 1.0
        super().log(logs, *args, **kwargs)


def build_model(args: ModelArguments) -> TTEFlashModel:
    tte = {"think_bidirectional": args.think_bidirectional, "cot_sees_query": args.cot_sees_query,
           "embedding_layer": args.embedding_layer, "attn_backend": args.attn_backend}
    if args.model in available_presets():
        return TTEFlashModel.from_preset(args.model, max_think_tokens=args.max_think_tokens, **tte)
    config_path = Path(args.model) / "config.json"
    if config_path.is_file() and read_local_config(args.model).get("model_type") == "qwen2_vl":
        return TTEFlashModel.from_backbone(args.model, max_think_tokens=args.max_think_tokens, **tte)
    model = TTEFlashModel.from_pretrained(args.model)
    for name, value in tte.items():  # a checkpoint keeps its own settings unless asked otherwise
        setattr(model.config, name, value)
    model.config.check_tte_fields()
    return model


def apply_liger_kernels(model, device_type: str):
    """Patch ``model``'s Qwen2-VL modules with Liger-Kernel's fused Triton kernels (RMSNorm, SwiGLU, M-RoPE,
    the vision tower's LayerNorm); the LM head and its loss are left alone (the COT loss has its own path).
    CUDA only; ``benchmarks/gpu_suite.py`` compares a step with and without them."""
    if device_type != "cuda":
        raise ValueError("--liger_kernels needs a CUDA device (Liger-Kernel's kernels are Triton GPU kernels)")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2_vl
    except ImportError as err:
        raise ImportError("--liger_kernels needs Liger-Kernel: pip install liger-kernel") from err
    apply_liger_kernel_to_qwen2_vl(rope=True, rms_norm=True, layer_norm=True, swiglu=True, cross_entropy=False,
                                   fused_linear_cross_entropy=False, model=model)
    return model


def apply_lora(model, args: ModelArguments):
    from peft import LoraConfig, get_peft_model
    targets = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    new_tokens = list(model.config.think_token_ids) + [model.config.emb_token_id]
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, trainable_token_indices={"embed_tokens": new_tokens})
    return get_peft_model(model, config)


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    config_file = None
    if argv and argv[0].endswith((".yaml", ".yml")):
        config_file = argv.pop(0)
    elif "--config" in argv:
        i = argv.index("--config")
        config_file = argv[i + 1]
        del argv[i:i + 2]
    defaults = {"report_to": "none", "remove_unused_columns": False, "logging_steps": 10, "save_strategy": "steps",
                "save_steps": 500, "dataloader_num_workers": 0, "output_dir": "runs/tte-flash"}
    if config_file:
        if not Path(config_file).is_file():
            raise FileNotFoundError(f"config file not found: {config_file}")
        defaults.update(yaml.safe_load(Path(config_file).read_text()) or {})
    known = {f for dc in (ModelArguments, DataArguments, TrainingArguments) for f in dc.__dataclass_fields__}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise ValueError(f"unknown keys in {config_file}: {unknown}")
    parser.set_defaults(**defaults)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.remove_unused_columns = False
    if data_args.think_warmup_steps < 0:
        raise ValueError(f"--think_warmup_steps must be >= 0, got {data_args.think_warmup_steps}")
    if data_args.think_warmup_accuracy is not None and not 0 < data_args.think_warmup_accuracy <= 1:
        raise ValueError(f"--think_warmup_accuracy must be in (0, 1], got {data_args.think_warmup_accuracy}")
    if data_args.temperature is not None and not (math.isfinite(data_args.temperature) and data_args.temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0, got {data_args.temperature}")
    if not math.isfinite(training_args.learning_rate) or training_args.learning_rate < 0:
        raise ValueError(f"--learning_rate must be a finite number >= 0, got {training_args.learning_rate}")
    for name in ("cot_weight", "distill_weight", "teacher_weight"):
        value = getattr(data_args, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--{name} must be a finite number >= 0, got {value}")
    steps = data_args.curriculum_steps
    if any(b <= 0 for b in steps) or any(b >= a for b, a in zip(steps, steps[1:])):
        raise ValueError(f"--curriculum_steps must be positive and strictly increasing, got {steps}")
    if data_args.query_with_trace and (steps or data_args.distill_weight > 0):
        raise ValueError("--query_with_trace (the explicit embedder) cannot be combined with --distill_weight or "
                         "--curriculum_steps (latent training that reads the traces itself)")
    return model_args, data_args, training_args


def resolve_resume(value, output_dir) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder (checked), ``true``/``last`` for the newest
    ``checkpoint-N`` in ``output_dir`` (the transformers convention), or ``false``/unset for a fresh run."""
    if value is None or value is False or str(value).strip().lower() in ("", "false"):
        return None
    text = str(value).strip()
    if value is True or text.lower() in ("true", "last"):
        from transformers.trainer_utils import get_last_checkpoint
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {text}: no checkpoint-N folder in --output_dir "
                                    f"{output_dir} to resume from")
        return last
    if not Path(text).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint: checkpoint not found: {text}")
    if not (Path(text) / "trainer_state.json").is_file():
        raise ValueError(f"--resume_from_checkpoint {text}: not a Trainer checkpoint (no trainer_state.json); pass a "
                         "checkpoint-N folder of a run, or true for the newest one in --output_dir")
    return text


def main(argv=None):
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    needs_trace = "--distill_weight" if data_args.distill_weight > 0 else \
        "--curriculum_steps" if data_args.curriculum_steps else None
    dataset = RowDataset(data_args.train_data, data_args.image_root, data_args.query_with_trace,  # before the model
                         needs_trace=needs_trace, validate=data_args.validate_data,
                         allow_outside_root=data_args.allow_outside_image_root)
    torch.manual_seed(training_args.seed)
    model = build_model(model_args)
    if model_args.freeze_vision:
        model.model.visual.requires_grad_(False)
    processor = model.processor
    temperature = data_args.temperature if data_args.temperature is not None else model.config.contrastive_temperature
    model.config.contrastive_temperature = temperature
    device_type = "cuda" if torch.cuda.is_available() and not training_args.use_cpu else "cpu"
    from .attention import resolve_backend
    packed = data_args.packed if data_args.packed is not None else \
        resolve_backend(model.config.attn_backend, torch.device(device_type)) == "triton"
    collator = TrainCollator(processor, think_budgets=data_args.think_tokens, use_cot=data_args.cot_weight > 0,
                             max_cot_tokens=data_args.max_cot_tokens, hard_negatives=data_args.hard_negatives,
                             packed=packed, seed=training_args.seed, teacher=data_args.distill_weight > 0,
                             curriculum_stages=len(data_args.curriculum_steps))
    if model_args.liger_kernels:
        apply_liger_kernels(model, device_type)
    if model_args.lora:
        model = apply_lora(model, model_args)
    if data_args.grad_cache:  # only the last chunk's backward syncs under DDP: a parameter that chunk does not touch
        # (e.g. a trainable vision tower on a text-only chunk) would never be averaged unless DDP looks for it
        if training_args.ddp_find_unused_parameters is False:
            raise ValueError("--grad_cache needs --ddp_find_unused_parameters true (or unset) under DDP: only the last "
                             "chunk's backward synchronises, and parameters it does not use would not be averaged")
        training_args.ddp_find_unused_parameters = True
    objective = Objective(temperature=temperature, cot_weight=data_args.cot_weight,
                          mask_duplicate_targets=data_args.mask_duplicate_targets,
                          distill_weight=data_args.distill_weight, distill_kind=data_args.distill_kind,
                          teacher_weight=data_args.teacher_weight)
    trainer = TTETrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                         objective=objective,
                         grad_cache_chunk_size=data_args.grad_cache_chunk_size if data_args.grad_cache else None,
                         think_warmup_steps=data_args.think_warmup_steps,
                         think_warmup_accuracy=data_args.think_warmup_accuracy,
                         curriculum_steps=data_args.curriculum_steps, on_nonfinite=data_args.on_nonfinite)
    gate = "" if data_args.think_warmup_accuracy is None else \
        f" and until the in-batch accuracy reaches {data_args.think_warmup_accuracy}"
    logger.info("training %s on %d rows; think budgets %s (K=0 for the first %d steps%s); cot_weight %s; %s batches; "
                "grad_cache=%s", model_args.model, len(dataset), data_args.think_tokens,
                data_args.think_warmup_steps, gate, data_args.cot_weight,
                "packed" if packed else "padded (rows filled)", data_args.grad_cache)
    result = trainer.train(resume_from_checkpoint=resume)
    final = trainer.model
    if model_args.lora:
        final = final.merge_and_unload()
    if trainer.is_world_process_zero():
        check_finite_state(final.state_dict(), f"the trained model to {training_args.output_dir}")
        final.save_pretrained(training_args.output_dir)
        summary = {"model": model_args.model, "train_data": data_args.train_data, "think_budgets": data_args.think_tokens,
                   "cot_weight": data_args.cot_weight, "distill_weight": data_args.distill_weight,
                   "distill_kind": data_args.distill_kind, "curriculum_steps": data_args.curriculum_steps, "train_rows": len(dataset), **result.metrics,
                   "log_history": trainer.state.log_history}
        Path(training_args.output_dir, "train_summary.json").write_text(json.dumps(summary, indent=2))
        logger.info("saved the trained model to %s", training_args.output_dir)
    return trainer

