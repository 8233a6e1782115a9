"""Pretrain a small Qwen2-VL backbone on the synthetic world (DESIGN.md §10): the ``tiny-instruct`` preset.

    python training/pretrain.py --output_dir runs/tiny-instruct --max_steps 6000 --seed 0      # the shipped preset
    python training/pretrain.py --output_dir runs/pilot --max_steps 50 --rope_theta 10000      # any Qwen2VLConfig choice
    bash training/build_tiny_reasoner.sh                     # the tiny-reasoner preset: deeper, one-word hops, a hop curriculum

Stage 1 of the CPU world, like a real VLM's pretraining + instruction tuning in one: next-token loss
on the answer of ``[image][prompt] -> answer`` samples drawn on the fly from :class:`tte_flash.world.World`
(grids 2x2-5x5 over 20 colours, positions, descriptions, moves with traces, counting, text facts).
A word-level byte-level BPE tokenizer is trained first on the world's text plus plain English.
The loop is a ``transformers.Trainer`` (checkpoints, ``--resume_from_checkpoint``, logging); each
step is the TTE forward with K=0 and the answer as the COT branch, which is exactly a causal LM
over ``[image][prompt][answer]`` with the loss on the answer. Every ``--eval_steps`` the backbone
answers held-out questions greedily (``tte_flash.world.evaluate_backbone``).

The output directory is a plain Qwen2-VL checkpoint (``model_type: qwen2_vl``, safetensors, its
tokenizer without any TTE token), the same kind of directory as Qwen2-VL-2B-Instruct:
``TTEFlashModel.from_backbone(dir)`` and ``training/train.py --model dir`` start TTE training from it.
``pretrain_summary.json`` holds the arguments, the evaluations, the time and the versions.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import (AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Trainer, TrainerCallback,
                          TrainingArguments)

from tte_flash.modeling import TTEFlashModel
from tte_flash.processing import collate
from tte_flash.tokenization import train_word_tokenizer
from tte_flash.world import ALL_EVAL_KINDS, EVAL_KINDS, TASKS, World, corpus_text, evaluate_backbone

logger = logging.getLogger("tte_flash.pretrain")

ENGLISH = """The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
This model reads small images of coloured squares and answers questions about them.
Retrieval finds the document that best matches a query; an embedding is a vector that represents a text or an image.
The answer is given after a short chain of thought, one step at a time, so that every step can be checked.
What is in the picture? Which one is bigger? How many are there? Where is it? Look at the image and think.
It was a bright cold day in April, and the clocks were striking thirteen. Call me a friend of the house.
Please describe what you see, then answer the question in one word. Thank you for reading this document.
Numbers: one two three four five six seven eight nine ten. Zero, first, second, third, last, next, before, after.
Left and right, up and down, above and below, top and bottom, inside and outside, near and far.
""".split("\n")


class WorldStream(torch.utils.data.IterableDataset):
    """Endless world samples; each dataloader worker gets its own seeded stream."""

    def __init__(self, seed: int, task_weights: dict | None = None, multi_questions: bool = True,
                 max_hops: int | None = None):
        self.seed, self.task_weights, self.multi_questions, self.max_hops = seed, task_weights, multi_questions, max_hops

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        world = World(seed=[self.seed, 0 if info is None else info.id], task_weights=self.task_weights,
                      multi_questions=self.multi_questions, max_hops=self.max_hops)
        while True:
            yield world.sample()


class PretrainCollator:
    """World samples -> a padded TTE batch with K=0 whose COT branch (the tokens with a loss) is the
    answer, or with ``prompt_loss`` the question and the answer (an image sample's whole text; a text
    sample's question after its facts). Token ids and positions are the same either way."""

    def __init__(self, processor, prompt_loss: bool = False, pause_tokens: int = 0, pause_p: float = 0.0,
                 seed: int = 0):
        self.processor, self.prompt_loss = processor, prompt_loss
        # pause-pretraining (arXiv 2310.02226): with probability pause_p a sample gets ``pause_tokens`` think
        # tokens between its prompt and its answer, laid out and masked exactly as in TTE training
        self.pause_tokens, self.pause_p = pause_tokens, pause_p
        self.rng = torch.Generator().manual_seed(seed)

    def __call__(self, samples):
        records, answers = [], []
        tokenizer = self.processor.tokenizer
        for s in samples:
            context, question = s["prompt"], ""
            if self.prompt_loss and s["image"] is not None:
                context, question = "", s["prompt"]
            elif self.prompt_loss and " Q: " in s["prompt"]:  # the facts stay context: they are random
                facts, sep, rest = s["prompt"].rpartition(" Q: ")
                context, question = facts, sep + rest
            item = {"text": context} if s["image"] is None else {"image": s["image"], "text": context}
            records.append(self.processor(item))
            question_ids = tokenizer(question, add_special_tokens=False).input_ids if question else []
            answers.append(question_ids + self.processor.tokenize_cot(s["answer"]))
        ks = [self.pause_tokens if self.pause_tokens and float(torch.rand((), generator=self.rng)) < self.pause_p
              else 0 for _ in samples]
        batch = collate(records, self.processor.think_token_ids, self.processor.emb_token_id, think_tokens=ks,
                        cot_ids=answers, packed=False, fill_rows=True, pad_id=self.processor.tokenizer.pad_token_id)
        return {"size": torch.zeros(len(samples)), "batch": batch}  # accelerate reads the batch size off the first tensor


class PretrainTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self._accuracy: list[float] = []

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # A checkpoint holds Qwen2-VL's original key layout (TTEFlashModel.save_pretrained), which Trainer's
        # own resume would load as is, matching no key and silently keeping the fresh weights: load it
        # through from_pretrained (which converts the layout) and copy every tensor, strictly.
        model = self.model if model is None else model
        loaded = TTEFlashModel.from_pretrained(resume_from_checkpoint)
        model.load_state_dict(loaded.state_dict(), strict=True)
        logger.info("loaded the weights of %s", resume_from_checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model.tte_forward(inputs["batch"])
        self._accuracy.append(float(out.cot_accuracy))
        return (out.cot_loss, out) if return_outputs else out.cot_loss

    def log(self, logs, *args, **kwargs):
        if self._accuracy:
            logs["token_accuracy"] = round(sum(self._accuracy) / len(self._accuracy), 4)
            self._accuracy = []
        super().log(logs, *args, **kwargs)


class EvalCallback(TrainerCallback):
    """Greedy answers to held-out world questions every ``every`` steps (and at the end)."""

    def __init__(self, every: int, n: int, history: list, kinds=EVAL_KINDS, pause_tokens: int = 0):
        self.every, self.n, self.history, self.kinds = every, n, history, tuple(kinds)
        self.pause_tokens = pause_tokens

    def _run(self, model, step):
        start = time.perf_counter()
        result = evaluate_backbone(model, n=self.n, kinds=self.kinds)
        if self.pause_tokens:  # the one-word kinds and locate again, answered after the pause tokens
            short = [k for k in self.kinds if k.endswith("_short") or k == "locate"]
            paused = evaluate_backbone(model, n=self.n, kinds=short, think_tokens=self.pause_tokens)
            result["examples"].update({f"pause_{k}": v for k, v in paused.pop("examples").items()})
            result.update({f"pause_{k}": v for k, v in paused.items()})
        model.train()
        result.update(step=step, seconds=round(time.perf_counter() - start, 1))
        self.history.append(result)
        logger.info("eval at step %d: %s", step, {k: v for k, v in result.items() if k != "examples"})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self._run(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._run(model, state.global_step)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def architecture(args) -> dict:
    """The preset-style spec of the backbone: every field is a Qwen2VLConfig field."""
    head_dim = args.hidden_size // args.num_heads
    if sum(args.mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {args.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    return {
        "text_config": {"hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
                        "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
                        "num_key_value_heads": args.num_kv_heads, "max_position_embeddings": 4096,
                        "rms_norm_eps": 1e-6,
                        "rope_parameters": {"rope_type": "default", "mrope_section": list(args.mrope_section),
                                            "rope_theta": args.rope_theta}},
        "vision_config": {"depth": args.vision_depth, "embed_dim": args.vision_embed_dim,
                          "hidden_size": args.hidden_size, "num_heads": args.vision_heads, "mlp_ratio": 2,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "tie_word_embeddings": True, "max_think_tokens": 0, "image_min_pixels": 3136, "image_max_pixels": 50176,
    }


def export_backbone(model: TTEFlashModel, tokenizer, output_dir: Path):
    """Save ``model`` as a plain Qwen2-VL checkpoint with ``tokenizer`` (no TTE tokens)."""
    fields = model.config.to_dict()
    keep = set(Qwen2VLConfig().to_dict())
    config = Qwen2VLConfig(**{k: v for k, v in fields.items() if k in keep and k not in ("model_type", "architectures")})
    backbone = Qwen2VLForConditionalGeneration(config)
    missing, unexpected = backbone.load_state_dict(model.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise RuntimeError(f"export mismatch: missing {missing}, unexpected {unexpected}")
    backbone.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    model.processor.image_processor.save_pretrained(output_dir)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", "--output-dir", required=True)
    p.add_argument("--max_steps", type=int, default=6000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--warmup_steps", type=int, default=200)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one per job on a shared CPU)")
    p.add_argument("--eval_steps", type=int, default=500)
    p.add_argument("--eval_n", type=int, default=100, help="held-out questions per kind at each evaluation")
    p.add_argument("--save_steps", type=int, default=1000)
    p.add_argument("--logging_steps", type=int, default=50)
    p.add_argument("--stop_at_step", type=int, default=None,
                   help="end the run after this step (and its checkpoint), as a kill would; for testing resumption")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="a Trainer checkpoint directory, or 'auto': the last one under output_dir/checkpoints if any")
    p.add_argument("--init_from", default=None,
                   help="start from this exported backbone (a later stage; the architecture flags are then ignored)")
    p.add_argument("--vocab_size", type=int, default=2048, help="BPE vocabulary (before special tokens)")
    p.add_argument("--corpus_size", type=int, default=20000, help="world samples the tokenizer is trained on")
    p.add_argument("--prompt_loss", action="store_true",
                   help="next-token loss on the question too, not only on the answer")
    p.add_argument("--multi_questions", action=argparse.BooleanOptionalAction, default=True,
                   help="some text samples ask several questions (--no-multi_questions: one each)")
    p.add_argument("--task_weights", type=_task_weights, default=None,
                   help="mix of world tasks, e.g. cell=0.3,text=0.2,move=0.3 (default: tte_flash.world.TASK_WEIGHTS; "
                        "also move_short, text_short)")
    p.add_argument("--max_hops", type=int, default=None,
                   help="cap the hops of move/move_short/text/text_short (a curriculum stage; default: no cap)")
    p.add_argument("--pause_tokens", type=int, default=0,
                   help="pause-pretraining: K think tokens between prompt and answer in a share --pause_p of the "
                        "samples; the exported backbone keeps them in its tokenizer and embeddings")
    p.add_argument("--pause_p", type=float, default=0.5, help="share of samples with pause tokens")
    p.add_argument("--eval_kinds", nargs="+", default=list(EVAL_KINDS), choices=ALL_EVAL_KINDS,
                   help="held-out question kinds evaluated every --eval_steps (tte_flash.world)")
    # architecture: Qwen2VLConfig fields
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--intermediate_size", type=int, default=384)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--num_kv_heads", type=int, default=2)
    p.add_argument("--rope_theta", type=float, default=10000.0)
    p.add_argument("--mrope_section", type=int, nargs=3, default=[4, 6, 6])
    p.add_argument("--vision_depth", type=int, default=2)
    p.add_argument("--vision_embed_dim", type=int, default=64)
    p.add_argument("--vision_heads", type=int, default=2)
    return p.parse_args(argv)


def _task_weights(text: str) -> dict[str, float]:
    weights = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in TASKS:
            raise argparse.ArgumentTypeError(f"unknown world task {name.strip()!r}; tasks: {sorted(TASKS)}")
        weights[name.strip()] = float(value)
    return weights


def last_checkpoint(folder: Path) -> str | None:
    """The Trainer checkpoint with the highest step under ``folder`` (``checkpoint-N``), or None."""
    steps = [(int(p.name.split("-")[1]), p) for p in Path(folder).glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(steps)[1]) if steps else None


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    if args.init_from:  # a later stage: continue from an exported backbone, its tokenizer and architecture
        base_tokenizer = AutoTokenizer.from_pretrained(args.init_from)
        model = TTEFlashModel.from_backbone(args.init_from, max_think_tokens=args.pause_tokens,
                                            image_min_pixels=3136, image_max_pixels=50176)
    else:
        saved = out / "checkpoints" / "backbone_tokenizer"  # kept for a resumed run: the same vocabulary for sure
        if saved.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(saved)
        else:
            corpus = corpus_text(args.corpus_size, seed=args.seed, task_weights=args.task_weights,
                                 multi_questions=args.multi_questions, max_hops=args.max_hops)
            tokenizer = train_word_tokenizer(corpus + ENGLISH, args.vocab_size)
            tokenizer.save_pretrained(saved)
        base_tokenizer = copy.deepcopy(tokenizer)  # the backbone's tokenizer: no TTE tokens
        model = TTEFlashModel.from_spec({**architecture(args), "max_think_tokens": args.pause_tokens}, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("backbone: %.2fM parameters, vocabulary %d", n_params / 1e6, len(base_tokenizer))

    history: list[dict] = []
    training_args = TrainingArguments(
        output_dir=str(out / "checkpoints"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, lr_scheduler_type="cosine",
        weight_decay=args.weight_decay, logging_steps=args.logging_steps, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=1, report_to="none", use_cpu=True, seed=args.seed, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True)
    stream = WorldStream(args.seed, args.task_weights, args.multi_questions, args.max_hops)
    trainer = PretrainTrainer(model=model, args=training_args, train_dataset=stream,
                              data_collator=PretrainCollator(model.processor, args.prompt_loss, args.pause_tokens,
                                                             args.pause_p, args.seed),
                              callbacks=[EvalCallback(args.eval_steps, args.eval_n, history, args.eval_kinds,
                                                      args.pause_tokens)]
                              + ([StopAt(args.stop_at_step)] if args.stop_at_step else []))
    resume = args.resume_from_checkpoint
    if resume == "auto":
        resume = last_checkpoint(out / "checkpoints")
        logger.info("resuming from %s", resume) if resume else logger.info("no checkpoint to resume from: a fresh start")
    result = trainer.train(resume_from_checkpoint=resume)
    # with pause tokens the backbone keeps them (from_backbone then reuses their rows): the TTE tokenizer
    export_backbone(model, model.processor.tokenizer if args.pause_tokens else base_tokenizer, out)
    summary = {"args": vars(args), "resumed_from": resume, "parameters": n_params, "vocabulary": len(base_tokenizer),
               "seconds": round(time.perf_counter() - start, 1), "evaluations": history,
               "final": history[-1] if history else None, "train_metrics": result.metrics,
               "log_history": trainer.state.log_history, "commit": _commit(),
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version()}}
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("saved the backbone to %s in %.0fs", out, summary["seconds"])
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
