"""Grow a Qwen2-VL backbone deeper without changing what it computes: the starting point of ``tiny-reasoner-grown``.

    python training/grow_backbone.py --source tiny-instruct --output_dir runs/grown/init --num_layers 8

A new decoder layer is inserted after each of the source's layers (``--num_layers`` a multiple of the
source's depth); it is a copy of the layer before it with its two residual-writing projections
(``self_attn.o_proj`` and ``mlp.down_proj``) set to zero, so at initialisation it adds nothing to the
residual stream and the grown model gives the source's outputs exactly (checked here, and in the tests).
Training then gives the new layers something to do: depth for one-pass answers, which 4 layers lack
(training/README.md). This is depth up-scaling with function-preserving (zero-residual) new blocks, as in
Net2Net (arXiv 1511.05641) and stacking-based growth (e.g. arXiv 2405.15319), instead of pretraining a
deeper model from random weights. The output is a plain Qwen2-VL checkpoint with the source's tokenizer
and image processor, for ``training/pretrain.py --init_from``.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

ZEROED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def source_dir(source: str) -> Path:
    """A preset name (``tiny-instruct``) or a backbone folder."""
    if Path(source).is_dir():
        return Path(source)
    import tte_flash
    preset = Path(tte_flash.__file__).parent / "presets" / source
    if not (preset / "config.json").is_file():
        raise FileNotFoundError(f"{source!r} is neither a backbone folder nor a preset folder under {preset.parent}")
    return preset


def grow_state_dict(state: dict[str, torch.Tensor], old_layers: int, factor: int) -> dict[str, torch.Tensor]:
    """Layer i of the source becomes layer ``factor * i``; layers ``factor * i + 1 .. factor * i + factor - 1``
    are copies of it whose residual-writing projections are zero."""
    pattern = re.compile(r"^(.*\.layers\.)(\d+)\.(.*)$")
    out = {}
    for name, tensor in state.items():
        match = pattern.match(name)
        if not match or "visual" in name:
            out[name] = tensor
            continue
        prefix, index, rest = match.group(1), int(match.group(2)), match.group(3)
        if index >= old_layers:
            raise ValueError(f"{name}: layer {index} beyond the source's {old_layers} layers")
        for j in range(factor):
            copy = tensor.clone()
            if j and rest in ZEROED:
                copy.zero_()
            out[f"{prefix}{factor * index + j}.{rest}"] = copy
    return out


def grow(source: str, output_dir: str, num_layers: int) -> Path:
    src = source_dir(source)
    config = Qwen2VLConfig.from_pretrained(src)
    old = config.text_config.num_hidden_layers
    if num_layers % old or num_layers <= old:
        raise ValueError(f"--num_layers {num_layers} must be a multiple of the source's {old} layers, larger than it")
    model = Qwen2VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    model.eval()
    grown_config = Qwen2VLConfig.from_pretrained(src)
    grown_config.text_config.num_hidden_layers = num_layers
    if getattr(grown_config.text_config, "layer_types", None):
        grown_config.text_config.layer_types = [grown_config.text_config.layer_types[0]] * num_layers
    grown = Qwen2VLForConditionalGeneration(grown_config)
    grown.eval()
    state = grow_state_dict(model.state_dict(), old, num_layers // old)
    missing, unexpected = grown.load_state_dict(state, strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise RuntimeError(f"grown model mismatch: missing {missing}, unexpected {unexpected}")
    if grown_config.tie_word_embeddings:
        grown.tie_weights()
    # the grown model computes what the source computes
    ids = torch.randint(0, config.text_config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (model(input_ids=ids).logits - grown(input_ids=ids).logits).abs().max().item()
    if difference > 1e-4:
        raise RuntimeError(f"the grown model differs from the source by {difference}")
    out = Path(output_dir)
    grown.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    # the image processor's config as it is (AutoImageProcessor needs torchvision on transformers 5.17)
    shutil.copy2(Path(src) / "preprocessor_config.json", out / "preprocessor_config.json")
    (out / "grow_summary.json").write_text(json.dumps({"source": str(source), "source_layers": old,
                                                       "num_layers": num_layers, "max_logit_difference": difference},
                                                      indent=2) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="tiny-instruct", help="a preset name or a Qwen2-VL backbone folder")
    p.add_argument("--output_dir", "--output-dir", required=True)
    p.add_argument("--num_layers", type=int, default=8)
    args = p.parse_args(argv)
    out = grow(args.source, args.output_dir, args.num_layers)
    print(f"grown backbone in {out}: {json.loads((out / 'grow_summary.json').read_text())}")


if __name__ == "__main__":
    main()
