"""The ``tte-flash`` command (also ``python -m tte_flash``).

* ``quickstart``: on the embedded ``tiny`` preset (random weights, offline, CPU), embed text+image
  queries with 16 think tokens, rank documents, save and reload, decode what the think tokens say.
* ``encode``: embed texts / image paths / a JSONL of input dicts into a ``.npy`` file, or into a directory of
  shards that a rerun resumes (``--output embs/``), on several devices (``--devices``).
* ``ray-encode``: the same shards, encoded on a Ray cluster with Ray Data (``tte_flash.distributed``).
* ``explain``: per think token, the vocabulary it decodes to, the decoded CoT, attention heatmaps.
* ``evaluate``: MMEB-style Hit@1 / NDCG@5 (``python -m tte_flash.evaluate``).
* ``card``: regenerate a run's model card (README.md) from its saved config and result files.
* ``demo``: train the tiny model on synthetic reasoning data, evaluate, explain (``tte_flash.demo``).
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _scene(color: str, shape: str, size: int = 112) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    return image


def quickstart(args) -> int:
    from tte_flash import TTEFlashModel

    start = time.perf_counter()
    model = TTEFlashModel.from_preset(args.model) if args.model in ("tiny", "qwen2-vl-2b") \
        else TTEFlashModel.from_pretrained(args.model)
    queries = [{"instruction": "Find the picture that answers the question.",
                "text": "Which shape is red?", "image": _scene("red", "circle")},
               "a blue square on a white background"]
    documents = ["a red circle", "a blue square", {"image": _scene("blue", "square")},
                 {"image": _scene("red", "circle")}]
    q = model.encode_query(queries, think_tokens=args.think_tokens)
    d = model.encode_document(documents)
    scores = model.similarity(q, d)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"random weights: rankings are not meaningful until trained)")
    print(f"queries embedded with {args.think_tokens} think tokens -> {tuple(q.shape)}; documents -> {tuple(d.shape)}")
    names = ["text: a red circle", "text: a blue square", "image: blue square", "image: red circle"]
    for qi, query in enumerate(["image+text: Which shape is red?", "text: a blue square ..."]):
        ranking = scores[qi].argsort(descending=True).tolist()
        print(f"  {query:34s} -> " + ", ".join(f"{names[j]} ({scores[qi, j]:.3f})" for j in ranking))
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.output_dir or tmp
        model.save_pretrained(out_dir)
        reloaded = TTEFlashModel.from_pretrained(out_dir)
        same = np.array_equal(reloaded.encode_query(queries, think_tokens=args.think_tokens), q)
        print(f"saved to {out_dir if args.output_dir else '(a temporary directory)'}; reloaded model gives "
              f"identical embeddings: {same}")
    cot = model.generate_cot(queries[0], think_tokens=args.think_tokens, max_new_tokens=16)
    print(f"decoded from the think tokens (untrained, so noise): {cot!r}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0 if same else 1


def load_model(name: str):
    from tte_flash.evaluate import load_model as load  # presets (warns when random), checkpoints, backbones
    return load(name)


def read_inputs(values: list[str], input_file: str | None):
    """Positional inputs, then the inputs of ``input_file`` (JSONL, or Parquet by its suffix), as one lazy stream."""
    from tte_flash.data import iter_encode_inputs
    if not values and not input_file:
        raise ValueError("nothing to encode: pass texts / image paths, or --input FILE.jsonl")
    if input_file and not Path(input_file).is_file():  # before the model loads, not at the first row
        raise FileNotFoundError(f"input file not found: {input_file}")
    # tte_flash.data's streaming reader: Parquet in pyarrow record batches (its text/image/video/instruction
    # columns only), JSONL line by line (strings or input dicts); errors name the file and the line
    return itertools.chain(values, iter_encode_inputs(input_file) if input_file else [])


def _part(value: str) -> tuple[int, int]:
    try:
        worker, workers = (int(x) for x in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part takes I/N (e.g. 0/2), got {value!r}") from None
    if not 0 <= worker < workers:
        raise argparse.ArgumentTypeError(f"--part {value}: I must be in 0..N-1")
    return worker, workers


def add_encode_options(parser) -> None:
    """The encoding options ``tte-flash encode`` and ``tte-flash ray-encode`` share (read by :func:`encode_kwargs`)."""
    parser.add_argument("--role", choices=("query", "document"), default="query",
                        help="query (default: with think tokens) or document (a corpus to search: no think tokens)")
    parser.add_argument("--think_tokens", "--think-tokens", type=int, default=None)
    parser.add_argument("--instruction", default=None, help="prepended to every input")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=32, help="most inputs per forward pass")
    parser.add_argument("--max_batch_tokens", "--max-batch-tokens", type=int, default=None,
                        help="most tokens per forward pass, padding included (default 16384; 0: no limit)")
    parser.add_argument("--max_length", "--max-length", type=int, default=None,
                        help="most tokens per input, think tokens and <emb> included; longer inputs lose text from "
                             "the end, with a warning")


def add_shard_options(parser, overwrite_help: str) -> None:
    parser.add_argument("--shard_size", "--shard-size", type=int, default=10_000, help="embeddings per shard")
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)


def encode_kwargs(args) -> dict:
    """``encode_query``/``encode_document`` keyword arguments from :func:`add_encode_options`' options."""
    kwargs = {"batch_size": args.batch_size, "max_length": args.max_length, "instruction": args.instruction}
    if args.max_batch_tokens is not None:
        kwargs["max_batch_tokens"] = args.max_batch_tokens or None
    if args.think_tokens is not None:
        kwargs["think_tokens"] = args.think_tokens
    return kwargs


def encode(args) -> int:
    if args.devices:
        return _encode_on_devices(args)
    shards = not args.output.endswith(".npy")
    if not shards and args.part != (0, 1):
        raise ValueError("--part needs a shard directory as --output (not a .npy file)")
    if not shards and Path(args.output).exists() and not args.overwrite:
        raise ValueError(f"{args.output} exists; --overwrite replaces it")
    items = read_inputs(args.inputs, args.input_file)
    model = load_model(args.model)
    kwargs = {**encode_kwargs(args), "device": args.device}
    options = {"role": args.role, "shard_size": args.shard_size, "model_name": args.model, "show_progress_bar": True,
               **kwargs}
    try:
        if shards:
            result = model.encode_to_shards(items, args.output, part=args.part, overwrite=args.overwrite, **options)
            dim = result["settings"]["dim"]
            print(f"{args.output}: {result['total']} x {dim} {args.role} embeddings in {result['num_shards']} shards "
                  f"({result['encoded_now']} encoded by this run; read them with tte_flash.read_shards)")
            return 0
        return _encode_to_npy(model, items, Path(args.output), args.overwrite, options)
    except OSError as err:  # a full disk, a read-only folder: one line, never a stack trace
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(str(err)) from err


def _encode_to_npy(model, items, output: Path, overwrite: bool, options: dict) -> int:
    """One ``.npy`` file, encoded as shards in ``<output>.partial/`` (a failure keeps the finished shards and
    the same command resumes them), then written whole and the shards removed."""
    import shutil

    from tte_flash.encoding import OtherSettingsError, read_shards
    from tte_flash.writing import atomic_write_bytes
    work = output.with_name(output.name + ".partial")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        try:
            model.encode_to_shards(items, work, **options)
        except OtherSettingsError:  # an unfinished run with other settings: --overwrite replaces it
            if not overwrite:
                raise
            model.encode_to_shards(items, work, overwrite=True, **options)
        vectors = read_shards(work)
        atomic_write_bytes(output, lambda handle: np.save(handle, vectors))  # never a half-written file
    except (ValueError, OSError) as err:
        if work.is_dir() and any(work.glob("shard-*.json")) and not isinstance(err, FileNotFoundError):
            raise ValueError(f"{err} (the finished shards are kept in {work}; rerun the same command to resume)") \
                from err
        raise
    shutil.rmtree(work)
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} {options['role']} embeddings to {output}")
    return 0


def _encode_on_devices(args) -> int:
    """One ``tte-flash encode --part i/N --device d`` process per device, all on one shard directory."""
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if args.output.endswith(".npy"):
        raise ValueError("--devices needs a shard directory as --output (not a .npy file)")
    if args.part != (0, 1):
        raise ValueError("--devices and --part are exclusive (--devices runs one --part per device)")
    argv = ["encode", *args.inputs, "--model", args.model, "--role", args.role, "--output", args.output,
            "--batch_size", str(args.batch_size), "--shard_size", str(args.shard_size)]
    for flag, value in (("--input", args.input_file), ("--think_tokens", args.think_tokens),
                        ("--max_length", args.max_length), ("--instruction", args.instruction),
                        ("--max_batch_tokens", args.max_batch_tokens)):
        if value is not None:
            argv += [flag, str(value)]
    if args.overwrite:  # cleared once here, not by every worker
        _clear_for_overwrite(Path(args.output))
    workers = [subprocess.Popen([sys.executable, "-m", "tte_flash", *argv, "--part", f"{i}/{len(devices)}",
                                 "--device", device]) for i, device in enumerate(devices)]
    codes = [w.wait() for w in workers]
    if any(codes):
        print(f"tte-flash encode: {sum(c != 0 for c in codes)} of {len(devices)} workers failed (exit codes {codes}); "
              "rerun the same command to resume", file=sys.stderr)
        return 1
    return 0


def _clear_for_overwrite(output: Path):
    """Remove the shards and manifest, holding the folder (refused while another writer is active)."""
    from tte_flash.encoding import MANIFEST
    from tte_flash.writing import folder_lock, remove_stale_temporaries
    if not output.is_dir():
        return
    with folder_lock(output, overwrite=True):
        for stale in [*output.glob("shard-*.npy"), *output.glob("shard-*.json"), output / MANIFEST]:
            stale.unlink(missing_ok=True)
        remove_stale_temporaries(output)


def explain_command(args) -> int:
    model = load_model(args.model)
    item = {"text": args.text} if args.text else {}
    if args.image:
        item["image"] = args.image
    result = model.explain(item, think_tokens=args.think_tokens, top_k=args.top_k, heatmap_dir=args.heatmap_dir,
                           max_new_tokens=args.max_new_tokens)
    for i, reading in enumerate(result.top_tokens):
        print(f"think {i:2d}: " + "  ".join(f"{tok!r} {p:.3f}" for tok, p in reading))
    print("<emb>   : " + "  ".join(f"{tok!r} {p:.3f}" for tok, p in result.emb_top_tokens))
    print(f"decoded CoT: {result.cot!r}")
    for path in result.heatmaps:
        print(f"heatmap: {path}")
    return 0


def card_command(args) -> int:
    from transformers import PreTrainedConfig

    from tte_flash import TTEFlashConfig
    from tte_flash.card import write_model_card
    if not (Path(args.run_dir) / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {args.run_dir}: not a saved model directory")
    config_dict, _ = PreTrainedConfig.get_config_dict(args.run_dir)
    if config_dict.get("model_type") != "tte_flash":
        raise ValueError(f"{args.run_dir} holds a {config_dict.get('model_type')!r} model, not TTE-Flash")
    config = TTEFlashConfig.from_pretrained(args.run_dir)
    options = {name: value for name, value in (("license", args.license), ("languages", args.language),
                                               ("datasets", args.datasets)) if value is not None}
    path = write_model_card(args.run_dir, config, model_id=args.model_id, force=args.force, **options)
    if path is None:
        print(f"{Path(args.run_dir) / 'README.md'} was not written by tte-flash: kept as it is (--force replaces it)",
              file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def evaluate_command(args) -> int:
    from tte_flash.evaluate import main as evaluate_main
    return evaluate_main(args.rest)


def demo_command(args) -> int:
    from tte_flash.demo import main as demo_main
    return demo_main(args.rest)


def ray_encode_command(args) -> int:
    from tte_flash.distributed import main as ray_encode_main
    return ray_encode_main(args.rest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tte-flash", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    qs = commands.add_parser("quickstart", help="embed, rank, save and reload on the tiny preset (CPU, offline)")
    qs.add_argument("--model", default="tiny", help="a preset name (tiny, qwen2-vl-2b) or a checkpoint path")
    qs.add_argument("--think-tokens", "--think_tokens", type=int, default=16)
    qs.add_argument("--output-dir", "--output_dir", default=None, help="keep the saved model here")
    qs.set_defaults(func=quickstart)

    enc = commands.add_parser("encode", help="embed inputs into a .npy file or a directory of shards (resumable)")
    enc.add_argument("inputs", nargs="*", help="texts or image/video paths")
    enc.add_argument("--input", "--input_file", "--input-file", dest="input_file",
                     help="JSONL: one input per line (a string or a dict with text/image/video/instruction); or "
                          "a .parquet file (its text/image/video/instruction columns); read lazily")
    enc.add_argument("--model", required=True, help="a trained checkpoint directory or Hub id (presets other than "
                                                     "tiny-instruct have random weights)")
    add_encode_options(enc)
    enc.add_argument("--output", default="embeddings.npy",
                     help="a .npy file, or a directory of .npy shards + manifest.json (resumed if rerun)")
    add_shard_options(enc, overwrite_help="replace a shard directory made with other settings, or an existing .npy")
    enc.add_argument("--device", default=None, help="e.g. cuda:0 (default: where the model loads)")
    enc.add_argument("--part", type=_part, default=(0, 1),
                     help="I/N: encode only shards I, I+N, ... (N processes share one --output directory)")
    enc.add_argument("--devices", default=None,
                     help="comma-separated devices (cuda:0,cuda:1): one --part process per device")
    enc.set_defaults(func=encode)

    exp = commands.add_parser("explain", help="what the think tokens decode to, and where they look")
    exp.add_argument("--model", required=True, help="a trained checkpoint directory or Hub id")
    exp.add_argument("--text", default="")
    exp.add_argument("--image", default=None)
    exp.add_argument("--think_tokens", "--think-tokens", type=int, default=None)
    exp.add_argument("--top_k", "--top-k", type=int, default=5)
    exp.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=64)
    exp.add_argument("--heatmap_dir", "--heatmap-dir", default=None, help="write attention heatmaps (PNG) here")
    exp.set_defaults(func=explain_command)

    card = commands.add_parser("card", help="regenerate a run's model card from its config and results")
    card.add_argument("run_dir")
    card.add_argument("--model_id", "--model-id", default=None, help="Hub id to show in the usage snippet")
    card.add_argument("--force", action="store_true", help="replace a README.md that tte-flash did not write")
    card.add_argument("--license", default=None, help="Hub license id (default apache-2.0, Qwen2-VL-2B's; what was set "
                      "before in this folder's generated card is kept)")
    card.add_argument("--language", nargs="+", default=None, help="ISO 639-1 codes of the training data (default en)")
    card.add_argument("--datasets", nargs="+", default=None,
                      help="Hub dataset ids of the training data (default: those recorded in train_summary.json)")
    card.set_defaults(func=card_command)

    for name, func, text in (("evaluate", evaluate_command, "Hit@1 / NDCG@5 on MMEB-eval rows"),
                             ("demo", demo_command, "train, evaluate and explain the tiny model on synthetic data"),
                             ("ray-encode", ray_encode_command, "encode --input FILE into shards on a Ray cluster "
                                                                "(Ray Data, one model actor per GPU)")):
        sub = commands.add_parser(name, help=text, add_help=False)
        sub.add_argument("rest", nargs=argparse.REMAINDER)
        sub.set_defaults(func=func)
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = {"evaluate": evaluate_command, "demo": demo_command, "ray-encode": ray_encode_command}
    if argv and argv[0] in passthrough:  # these parse their own flags
        return passthrough[argv[0]](argparse.Namespace(rest=argv[1:]))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as err:  # clear message, no stack trace (OSError: unreadable files)
        print(f"tte-flash {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # complete shards are kept; the same command resumes
        print(f"tte-flash {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
