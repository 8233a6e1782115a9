"""Kernel correctness at the model's shapes: the fused TTE kernel in bf16/fp16 against float64, forward and grads.

Random packings of TTE samples (odd query and COT lengths, K in {0, 4, 16, 32}, some samples without COT) at
Qwen2-VL-2B's attention shapes (12 query heads over 2 KV heads, head dim 128; also 64), every flag combination.
The reference is explicit float64 softmax attention on the dense mask (:func:`tte_flash.mask.dense_mask`), on
the same (rounded) inputs. A case passes when, for the output and each of dQ, dK, dV, the kernel's error
(max abs, relative to the reference's max abs) is at most ``--factor`` (3) times that of
plain attention computed in the low dtype throughout, plus ``--slack`` (the shape of FlashAttention's test
criterion: about as accurate as a straightforward low-precision implementation; a flash kernel rounds P and dS
to 16 bits before its matmuls, and under the CPU interpreter at head dims 16-64 the kernel's error was 1.0-3.0x
the plain one over 8 packings, hence 3). PyTorch SDPA's error in the low dtype (fp32 inside) is recorded too.
A mask bug that hides or shows one key in thirty moves the output by percents: far outside the allowance.

Variants (``--variants``; all by default): ``packed`` - the random packings above, every flag combination and
seed; and, once per dtype and head dim with the default flags, ``t16`` - a packing of T rounded up to a multiple
of 16 (the launches specialise on T % 16 == 0: other code than the odd T), ``long`` - one sample filling the
whole T (a long query, K=16, emb, a long COT: every tile of the diagonal band, most of them full), ``group1`` -
as many KV heads as query heads (no GQA). These run the shipped tiles and 16-bit rounding of P and dS, which the
CPU interpreter cannot (it forces 16x16 tiles and upcasts 16-bit dots).

    python benchmarks/kernel_check.py --out results/             # GPU: full shapes, ~4k-token packings
    python benchmarks/kernel_check.py --tiny                     # CPU under TRITON_INTERPRET=1: the code path

Exit status 1 when any case fails (wrong results; a crash exits 1 too, with a traceback and no failed row).
Writes JSON rows when ``--out`` is given; ``--jsonl PATH`` appends each case's row as soon as it is checked.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tte_flash.mask import COT, EMB, QUERY, THINK, dense_mask  # noqa: E402


def random_packing(tokens: int, gen: torch.Generator, device, longest: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of (query 1..longest, think K in {0, 4, 16, 32}, emb, COT 0..longest/2) tokens packed up to
    ``tokens`` (the last sample cut short)."""
    seq, types, sample = [], [], 0
    while len(seq) < tokens:
        query = int(torch.randint(1, longest, (1,), generator=gen))
        think = [0, 4, 16, 32][int(torch.randint(0, 4, (1,), generator=gen))]
        cot = 0 if bool(torch.rand(1, generator=gen) < 0.3) else int(torch.randint(1, longest // 2, (1,), generator=gen))
        for token_type, n in ((QUERY, query), (THINK, think), (EMB, 1), (COT, cot)):
            seq += [sample] * n
            types += [token_type] * n
        sample += 1
    return (torch.tensor(seq[:tokens], dtype=torch.int32, device=device),
            torch.tensor(types[:tokens], dtype=torch.uint8, device=device))


def long_packing(tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample filling ``tokens``: a query of ~70%, K=16 think tokens, emb, the rest COT."""
    query = max(1, min(tokens - 18, int(tokens * 0.7)))
    lengths = [(QUERY, query), (THINK, min(16, tokens - query)), (EMB, 1 if tokens > query + 16 else 0)]
    lengths.append((COT, tokens - sum(n for _, n in lengths)))
    types = [t for t, n in lengths for _ in range(n)]
    return (torch.zeros(tokens, dtype=torch.int32, device=device), torch.tensor(types, dtype=torch.uint8, device=device))


def dense_attention(q, k, v, mask, scale):
    """Explicit softmax attention, every op in q's dtype (the reference in float64; in a 16-bit dtype the
    low-precision baseline, as FlashAttention's tests build theirs)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    probs = (torch.einsum("ihd,jhd->hij", q, k) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hij,jhd->ihd", probs, v)


def sdpa(q, k, v, mask, scale):
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1]).transpose(0, 1)


def _grads(fn, inputs, d_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, d_out.to(out.dtype))]


def check_case(tokens, q_heads, kv_heads, head_dim, dtype, think_bidirectional, cot_sees_query, seed, device,
               slack, longest=400, factor=3.0, variant="packed") -> dict:
    from tte_flash.kernels import tte_attention
    gen = torch.Generator().manual_seed(seed)
    seq_ids, types = (long_packing(tokens, device) if variant == "long"
                      else random_packing(tokens, gen, device, longest))
    q, k, v = (torch.randn(tokens, h, head_dim, generator=gen).to(device, dtype)
               for h in (q_heads, kv_heads, kv_heads))
    d_out = torch.randn(tokens, q_heads, head_dim, generator=gen).to(device)
    scale = head_dim ** -0.5
    flags = dict(think_bidirectional=think_bidirectional, cot_sees_query=cot_sees_query)
    mask = dense_mask(seq_ids, types, **flags)
    reference = _grads(lambda a, b, c: dense_attention(a, b, c, mask, scale), [x.double() for x in (q, k, v)],
                       d_out.double())
    kernel = _grads(lambda a, b, c: tte_attention(a, b, c, seq_ids, types, scale=scale, **flags), [q, k, v], d_out)
    # the baseline: the same attention computed in the low dtype throughout; PyTorch SDPA's error beside it
    baseline = _grads(lambda a, b, c: dense_attention(a, b, c, mask, scale), [q, k, v], d_out)
    framework = _grads(lambda a, b, c: sdpa(a, b, c, mask, scale), [q, k, v], d_out)
    row = {"variant": variant, "tokens": tokens, "samples": int(seq_ids[-1]) + 1, "q_heads": q_heads, "kv_heads": kv_heads,
           "head_dim": head_dim, "dtype": str(dtype)[6:], "think_bidirectional": think_bidirectional,
           "cot_sees_query": cot_sees_query, "seed": seed, "ok": True}
    for name, got, base, torch_sdpa, want in zip(("out", "dq", "dk", "dv"), kernel, baseline, framework, reference):
        size = want.abs().max().clamp(min=1e-12)
        err = float((got.double() - want).abs().max() / size)
        base_err = float((base.double() - want).abs().max() / size)
        finite = bool(torch.isfinite(got).all())
        row[f"{name}_err"], row[f"{name}_baseline_err"] = err, base_err
        row[f"{name}_sdpa_err"] = float((torch_sdpa.double() - want).abs().max() / size)
        if not finite or err > factor * base_err + slack:
            row["ok"] = False
            row.setdefault("failed", []).append(name if finite else f"{name} (non-finite)")
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small sizes (the CPU default, under the interpreter)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="packing sizes (default 1021 4093; tiny 97)")
    p.add_argument("--head-dims", "--head_dims", type=int, nargs="+", default=None)
    p.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float16"), default=["bfloat16", "float16"])
    p.add_argument("--seeds", type=int, default=2, help="random packings per shape")
    p.add_argument("--slack", type=float, default=1e-3, help="absolute allowance on the relative error")
    p.add_argument("--factor", type=float, default=3.0, help="allowed multiple of the plain low-precision error")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="packed: random packings x every flag; t16 / long / group1: T %% 16 == 0, one long sample, "
                        "no GQA (once per dtype and head dim, default flags)")
    p.add_argument("--out", type=Path, default=None, help="directory for kernel_check.json")
    p.add_argument("--jsonl", type=Path, default=None, help="append each case's row here as soon as it is checked")
    args = p.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.tokens = args.tokens or ([97] if tiny else [1021, 4093])
    args.head_dims = args.head_dims or ([32] if tiny else [128, 64])
    args.heads = (4, 2) if tiny else (12, 2)
    args.longest = 40 if tiny else 400  # several samples per packing at tiny sizes too
    if tiny and args.seeds > 1:
        args.seeds = 1
    return args


VARIANTS = ("packed", "t16", "long", "group1")


def cases_of(args) -> list[tuple]:
    """(variant, tokens, heads, head dim, dtype, think_bidirectional, cot_sees_query, seed) of every case: the
    random packings with every flag first, then each extra variant once per dtype and head dim."""
    cases = []
    if "packed" in args.variants:
        cases += [("packed", tokens, args.heads, head_dim, dtype, bidir, sees_query, seed)
                  for tokens, head_dim, dtype, bidir, sees_query, seed in itertools.product(
                      args.tokens, args.head_dims, args.dtypes, (False, True), (True, False), range(args.seeds))]
    tokens = max(args.tokens)
    for head_dim, dtype in itertools.product(args.head_dims, args.dtypes):
        if "t16" in args.variants:
            cases.append(("t16", -(-tokens // 16) * 16 if tokens % 16 else tokens + 16, args.heads, head_dim,
                          dtype, False, True, 0))
        if "long" in args.variants:
            cases.append(("long", tokens, args.heads, head_dim, dtype, False, True, 0))
        if "group1" in args.variants:
            cases.append(("group1", tokens, (args.heads[0], args.heads[0]), head_dim, dtype, False, True, 0))
    return cases


def append_jsonl(path, row: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(dict(row, source="kernel_check")) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows, start = [], time.perf_counter()
    cases = cases_of(args)
    for n, (variant, tokens, heads, head_dim, dtype, bidir, sees_query, seed) in enumerate(cases, 1):
        row = check_case(tokens, *heads, head_dim, getattr(torch, dtype), bidir, sees_query, seed,
                         args.device, args.slack, longest=args.longest, factor=args.factor, variant=variant)
        row["seconds"] = round(time.perf_counter() - start, 1)  # since the start: compiles included
        rows.append(row)
        append_jsonl(args.jsonl, row)
        print(f"  [{n}/{len(cases)}] {variant} T={tokens} heads={heads[0]}/{heads[1]} d={head_dim} {dtype} "
              f"bidir={bidir} cot_sees_query={sees_query} "
              f"seed={seed}: {'ok' if row['ok'] else 'FAILED ' + ','.join(row['failed'])} "
              f"(out {row['out_err']:.1e} vs {row['out_baseline_err']:.1e}, dk {row['dk_err']:.1e} vs "
              f"{row['dk_baseline_err']:.1e}; SDPA {row['out_sdpa_err']:.1e}, {row['dk_sdpa_err']:.1e})", file=sys.stderr)
    failed = [r for r in rows if not r["ok"]]
    summary = {"cases": len(rows), "failed": len(failed), "seconds": round(time.perf_counter() - start, 1),
               "device": args.device}
    print(f"kernel_check: {len(rows) - len(failed)}/{len(rows)} cases within {args.factor}x the plain low-precision error + "
          f"{args.slack}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel_check.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return {"summary": summary, "rows": rows}


if __name__ == "__main__":
    sys.exit(1 if main()["summary"]["failed"] else 0)
