"""Peak memory of the COT loss at full vocabulary: the chunked linear cross-entropy vs the plain loss.

The COT loss is the LM head (V x H) applied to the hidden states of the COT tokens, then cross-entropy. The
plain way materialises (tokens, V) fp32 logits and their gradient; :func:`tte_flash.losses.linear_cross_entropy`
holds one chunk of logits at a time. This measures, for each, the memory a forward + backward adds on top of its
inputs (hidden states, head weight, targets), at Qwen2-VL-2B's sizes by default (H 1536, V 151,936, 4,096 COT
tokens, bf16), with the head frozen (the LoRA recipe) and trainable (full fine-tuning).

    python benchmarks/cot_loss_memory.py                     # CPU: peak RSS per case, each in its own process
    python benchmarks/cot_loss_memory.py --tokens 1024 --no-plain

On CPU each case runs in a fresh process and the added peak is VmHWM - VmRSS (Linux /proc; the peak is reset
after the inputs are built); on CUDA it is ``max_memory_allocated`` minus the memory allocated before the call.
Results: a table, and JSON under benchmarks/results/ (``--no-save`` for the table only).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._common import (default_results_path, device_name, git_commit, proc_memory_bytes,  # noqa: E402
                               reset_peak_rss, versions)

TARGET_GB = 0.5  # issue 10: the fused COT loss at H 1536, V 151,936, 4,096 tokens


def _status_bytes(field: str) -> int:
    value = proc_memory_bytes(field)
    if value is None:
        raise RuntimeError(f"no {field} in /proc/self/status: the CPU measurement needs Linux")
    return value


def run_case(method: str, tokens: int, hidden_size: int, vocab: int, dtype: torch.dtype, head_trainable: bool,
             device: torch.device) -> dict:
    """One forward + backward; returns the added peak memory in bytes and the loss (for a cross-check)."""
    from tte_flash.losses import linear_cross_entropy
    gen = torch.Generator(device=device).manual_seed(0)
    # built directly in the target dtype (no fp32 temporaries that would raise the baseline's peak)
    hidden = torch.empty(tokens, hidden_size, dtype=dtype, device=device).normal_(generator=gen)
    weight = torch.empty(vocab, hidden_size, dtype=dtype, device=device).normal_(std=0.02, generator=gen)
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    hidden.requires_grad_(True)
    weight.requires_grad_(head_trainable)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): the CPU measurement needs Linux")
        before = _status_bytes("VmRSS")
    start = time.perf_counter()
    if method in ("chunked", "liger"):
        loss, _ = linear_cross_entropy(hidden, weight, targets, backend=method)
    else:
        loss = F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = _status_bytes("VmHWM") - before
    # the gradients themselves (hidden's, and the head's when trainable) are outputs, counted in the peak
    return {"method": method, "tokens": tokens, "hidden": hidden_size, "vocab": vocab, "dtype": str(dtype)[6:],
            "head_trainable": head_trainable, "peak_added_bytes": int(peak),
            "loss_per_token": float(loss) / tokens, "seconds": round(time.perf_counter() - start, 2)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-plain", "--no_plain", action="store_true", help="skip the plain (full-logits) loss")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-save", "--no_save", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one case, JSON on stdout
    args = p.parse_args(argv)
    for name in ("tokens", "hidden", "vocab"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.child:
        method, trainable = args.child.split(":")
        print(json.dumps(run_case(method, args.tokens, args.hidden, args.vocab, dtype, trainable == "1", device)))
        return {}
    from tte_flash.losses import _liger_linear_cross_entropy
    methods = ["chunked"] + (["liger"] if device.type == "cuda" and _liger_linear_cross_entropy() else []) \
        + ([] if args.no_plain else ["plain"])
    cases = [(m, t) for m in methods for t in (False, True)]
    rows = []
    for method, trainable in cases:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            rows.append(run_case(method, args.tokens, args.hidden, args.vocab, dtype, trainable, device))
        else:  # a fresh process per case: CPU peak RSS is per process and never goes down
            cmd = [sys.executable, __file__, "--child", f"{method}:{int(trainable)}", "--tokens", str(args.tokens),
                   "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype,
                   "--device", "cpu"] + (["--threads", str(args.threads)] if args.threads else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"cot_loss_memory: case {method} (head trainable {trainable}) failed:\n"
                                 f"{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"  {method:<8} head {'trainable' if trainable else 'frozen   '}: "
              f"+{r['peak_added_bytes'] / 2**30:.3f} GiB in {r['seconds']:.1f} s", file=sys.stderr)
    print(f"\nCOT loss fwd+bwd, {args.tokens} tokens, H {args.hidden}, V {args.vocab}, {args.dtype}, "
          f"{device_name(device)}: memory added on top of the inputs")
    print(f"{'method':<9} {'head':<10} {'peak added GiB':>14} {'seconds':>8} {'loss/token':>10}")
    for r in rows:
        print(f"{r['method']:<9} {'trainable' if r['head_trainable'] else 'frozen':<10} "
              f"{r['peak_added_bytes'] / 2**30:>14.3f} {r['seconds']:>8.1f} {r['loss_per_token']:>10.4f}")
    frozen = next(r for r in rows if r["method"] == "chunked" and not r["head_trainable"])
    meets = frozen["peak_added_bytes"] <= TARGET_GB * 2**30
    print(f"target: chunked, frozen head (LoRA) <= {TARGET_GB} GB: "
          f"{frozen['peak_added_bytes'] / 2**30:.3f} GiB -> {'met' if meets else 'NOT met'}")
    agreement = check_backends(device, dtype) if "liger" in methods else None
    if agreement is not None:
        print(f"liger vs chunked (and float64): {agreement}")
    result = {"meta": {"device": device_name(device), "versions": versions(), "commit": git_commit(),
                       "threads": torch.get_num_threads(), "target_gb": TARGET_GB},
              "rows": rows, "target_met": meets, "backend_agreement": agreement}
    if not args.no_save:
        path = args.json or default_results_path("cot-loss-memory", device)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}", file=sys.stderr)
    if agreement is not None and not agreement["ok"]:
        raise SystemExit("cot_loss_memory: Liger's loss or gradients disagree with the float64 loss (see above)")
    return result


def check_backends(device: torch.device, dtype: torch.dtype, tokens: int = 1031, hidden_size: int = 256,
                   vocab: int = 32003) -> dict:
    """Liger's and the chunked loss against float64 on the same (rounded) inputs: value and both gradients,
    as relative max errors; ``ok`` when Liger's are within 2x the chunked path's + 1e-3."""
    from tte_flash.losses import linear_cross_entropy
    gen = torch.Generator(device=device).manual_seed(1)
    h = torch.empty(tokens, hidden_size, device=device, dtype=dtype).normal_(generator=gen)
    w = torch.empty(vocab, hidden_size, device=device, dtype=dtype).normal_(std=0.05, generator=gen)
    t = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.T, t, reduction="sum")
    want = [ref.detach(), *torch.autograd.grad(ref, (h64, w64))]
    errors = {}
    for backend in ("chunked", "liger"):
        hb, wb = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = linear_cross_entropy(hb, wb, t, backend=backend)
        got = [loss.detach(), *torch.autograd.grad(loss, (hb, wb))]
        errors[backend] = [float((g.double() - r).abs().max() / r.abs().max()) for g, r in zip(got, want)]
    ok = all(lg <= 2 * ch + 1e-3 for lg, ch in zip(errors["liger"], errors["chunked"]))
    return {"ok": ok, "relative_errors [loss, d_hidden, d_weight]": errors}


if __name__ == "__main__":
    main()
