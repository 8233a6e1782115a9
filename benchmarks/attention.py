"""Attention kernel benchmark: the fused TTE kernel against the alternatives, on packed TTE layouts.

Providers (same inputs, same layout):

* ``tte-triton``  - :func:`tte_flash.kernels.tte_attention_with_layout`, mask computed in-kernel; the
  layout's checks and O(T) bounds (:func:`~tte_flash.kernels.prepare_layout`, done once per training step
  for all layers) are left out of the timing, like FlexAttention's block mask and FA2's ``cu_seqlens``;
* ``tte-triton-tma`` - the same kernels with their streamed tiles loaded through TMA descriptors (the forward's
  and dQ's K/V, the dK/dV kernel's Q/dO; ``KernelConfig.tma`` on the shipped tiles; a what-if, off in the shipped
  configs); sm_90 GPUs, head dims 64 and 128;
* ``tte-triton-pairs`` - the same kernels with the backward's partial tiles masking their 16-bit P / dS two elements
  an instruction (``KernelConfig.pair_mask``: packed fp16 compares in inline PTX, half the mask instructions of
  an int32 compare and a select per element; dQ up to head dim 128, dK/dV all; a what-if, off in the shipped
  configs); CUDA, bf16 / fp16;
* ``tte-triton-block-order`` - the shipped kernel with each program taking block ``p`` instead of the block table's
  longest-first order: the A/B of that order (predicted gains: ``block_table_build.py --schedule``).
  The variants are first checked against ``tte-triton`` on the same inputs (output and q/k/v gradients): a
  difference over bf16 rounding gives a row with ``status`` ``wrong-results`` and no timing;
* ``sdpa-dense``  - PyTorch SDPA with the dense (T x T) boolean mask of :func:`tte_flash.mask.dense_mask`
  (built once, outside the timing; K/V repeated to the query heads inside);
* ``flex``        - compiled FlexAttention with a ``mask_mod`` derived from :func:`tte_flash.mask.visible`
  (block mask built once, outside the timing); CUDA only;
* ``fa2-varlen``  - FlashAttention-2 varlen with plain per-sample causal masking, the speed-of-light
  reference (a slightly different mask): ``flash_attn.flash_attn_varlen_func`` where flash-attn is installed,
  else PyTorch's own FlashAttention-2 kernels through ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.9;
  causal as ``window_size=(-1, 0)`` from 2.11, ``is_causal=True`` before), else
  ``torch.ops.aten._flash_attention_forward`` with ``cu_seqlens``. Every row says which (``implementation``);
  where none runs, a row with ``status`` ``unavailable`` and the reason is written, never nothing.

Layouts: ``train`` packs samples of ~300 query + 16 think + 1 emb + ~128 cot tokens, ``infer`` the same
without COT, truncated to exactly ``--tokens`` tokens. Shapes default to Qwen2-VL-2B attention
(12 query heads, 2 KV heads, head_dim 128, bf16). Modes: ``fwd``, ``bwd`` (backward of a retained graph)
and ``fwd+bwd``. Each is timed with CUDA events after warm-up (``perf_counter`` on the CPU); p20/p50/p80
are reported. Useful TFLOP/s count only visible query-key pairs: 4 * D * pairs * Hq for the forward,
2.5x that for the backward (3.5x for both); FA2 is credited with its own causal pairs. Peak memory is
``torch.cuda.max_memory_allocated`` above what was allocated before the call. DESIGN.md §9 targets on
H100: fwd+bwd >= 1.2x FlexAttention and >= 1.0x FA2 varlen causal in useful TFLOP/s.

Rows go to ``benchmarks/results/attention-<device>-<date>.json`` (or ``--output``) with the device,
versions and commit; a table with ratios (TTE TFLOP/s over each provider's) is printed. ``--jsonl PATH``
also appends every row the moment it is measured (a provider that fails or is missing gets a row with its
``status`` and reason), so a run killed in, say, FlexAttention's first compile keeps the rows before it.

Tile accounting (``--tile-counts``, pure CPU arithmetic on the layout, no kernel launch): per kernel block
shape, the tiles the kernels visit, how many hold a visible pair, how many evaluate the per-element mask
(partial) or run mask-free (full), visible pairs over computed pairs, and metadata loads per visited tile,
for the previous scheme (each program scanned a contiguous key range from O(T) bounds and classified every
tile from five scalar loads; partial tiles loaded seq ids and types per key) and the block table (8 int32
range bounds per program, none per tile; partial masks from interval bounds loaded once per program). Rows go to
``benchmarks/results/attention-tiles-cpu-<date>.json``.

    python benchmarks/attention.py                          # GPU: 4k, 8k, 16k tokens, both layouts
    python benchmarks/attention.py --device cpu --tiny      # the code path only, under the interpreter (the CPU default)
    python benchmarks/attention.py --tile-counts            # tile counts at 4k, 8k, 16k tokens, old vs new scheme
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Without CUDA the kernel runs under the Triton interpreter, which must be chosen before triton is
# imported (importing tte_flash imports it, through transformers).
if not torch.cuda.is_available() or "cpu" in sys.argv[1:] or "--device=cpu" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_results_path, device_name, git_commit, versions  # noqa: E402

from tte_flash.mask import COT, EMB, QUERY, THINK, dense_mask, visible  # noqa: E402

# the kernel and the fastest reference first, FlexAttention (a compile), the kernel's A/B variants, the dense mask
# (a run takes them in the order --providers names them)
PROVIDERS = ("tte-triton", "fa2-varlen", "flex", "tte-triton-block-order", "tte-triton-tma", "tte-triton-pairs",
             "sdpa-dense")
# what runs without --providers: the kernel and its competitors (the tte-triton-* variants are A/Bs of the kernel,
# asked for by name: the loan does)
DEFAULT_PROVIDERS = ("tte-triton", "fa2-varlen", "flex", "sdpa-dense")
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


@dataclass
class Layout:
    """A packed layout: per-token metadata and the per-sample (query, think, emb, cot) lengths."""
    name: str
    seq_ids: torch.Tensor  # (T,) int32
    token_types: torch.Tensor  # (T,) uint8
    samples: list  # [(query, think, emb, cot), ...]

    @property
    def tokens(self) -> int:
        return len(self.seq_ids)


def make_layout(name: str, tokens: int, device, tiny: bool, seed: int = 0) -> Layout:
    """Pack TTE samples (``train``: with COT, ``infer``: without) into exactly ``tokens`` tokens."""
    rng = np.random.default_rng(seed)
    samples, total = [], 0
    while total < tokens:
        query = int(rng.integers(6, 13) if tiny else rng.integers(250, 351))
        think = 2 if tiny else 16
        cot = 0 if name == "infer" else int(rng.integers(3, 7) if tiny else rng.integers(96, 161))
        lengths = [query, think, 1, cot]
        room = tokens - total  # truncate the last sample: a prefix of a sample is a valid sample
        for i, length in enumerate(lengths):
            lengths[i] = min(length, room)
            room -= lengths[i]
        samples.append(tuple(lengths))
        total += sum(lengths)
    seq_ids = np.concatenate([np.full(sum(s), i) for i, s in enumerate(samples)])
    token_types = np.concatenate([np.repeat([QUERY, THINK, EMB, COT], s) for s in samples])
    return Layout(name, torch.tensor(seq_ids, dtype=torch.int32, device=device),
                  torch.tensor(token_types, dtype=torch.uint8, device=device), samples)


def visible_pairs(layout: Layout, options: dict) -> int:
    """Visible query-key pairs under the TTE mask, counted one sample at a time (no T x T mask)."""
    pairs = 0
    for sample in layout.samples:
        types = torch.tensor(np.repeat([QUERY, THINK, EMB, COT], sample))
        pairs += int(dense_mask(torch.zeros_like(types), types, **options).sum())
    return pairs


def causal_pairs(layout: Layout) -> int:
    return sum(sum(s) * (sum(s) + 1) // 2 for s in layout.samples)


# ----------------------------------------------------------------------------------------------------
# Providers: setup() returns a callable computing (T, Hq, D) from the packed q, k, v
# ----------------------------------------------------------------------------------------------------

def setup(provider: str, layout: Layout, q, k, v, options: dict):
    group = q.shape[1] // k.shape[1]
    if provider == "tte-triton":
        from tte_flash.kernels import prepare_layout, tte_attention_with_layout
        prepared = prepare_layout(layout.seq_ids, layout.token_types, **options)  # once per step, all layers
        return lambda: tte_attention_with_layout(q, k, v, prepared)
    if provider == "tte-triton-tma":
        return _tte_with_tma(layout, q, k, v, options)
    if provider == "tte-triton-pairs":
        return _tte_with_pair_masks(layout, q, k, v, options)
    if provider == "tte-triton-block-order":
        return _tte_in_block_order(layout, q, k, v, options)
    if provider == "sdpa-dense":
        mask = dense_mask(layout.seq_ids, layout.token_types, **options)  # (T, T), outside the timing

        def sdpa():
            heads_first = [x.transpose(0, 1) for x in (q, k.repeat_interleave(group, 1),
                                                      v.repeat_interleave(group, 1))]  # (Hq, T, D)
            return F.scaled_dot_product_attention(*heads_first, attn_mask=mask).transpose(0, 1)
        return sdpa
    if provider == "flex":
        if q.device.type != "cuda":
            raise RuntimeError("FlexAttention is benchmarked on CUDA only")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        seq_ids, token_types = layout.seq_ids, layout.token_types

        def mask_mod(batch, head, q_idx, kv_idx):
            return visible(seq_ids[q_idx], token_types[q_idx], q_idx, seq_ids[kv_idx], token_types[kv_idx], kv_idx,
                           **options)
        block_mask = create_block_mask(mask_mod, None, None, layout.tokens, layout.tokens, device=q.device)
        compiled = _compiled_flex(flex_attention)
        return lambda: compiled(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=block_mask,
                                enable_gqa=True)[0].transpose(0, 1)
    if provider == "fa2-varlen":
        lengths = torch.tensor([sum(s) for s in layout.samples], device=q.device)
        cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
        return fa2_varlen(q, k, v, cu_seqlens, int(lengths.max()))
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def _kernel_module():
    import importlib
    return importlib.import_module("tte_flash.kernels.tte_attention")  # the module (the package's name is the function)


def _checked(call, shipped, q, k, v, exact: bool = False):
    """Tag a kernel variant's callable with ``.check``: the largest differences of its output and of its q/k/v
    gradients (one backward of a fixed random dO) from the shipped kernel's on the same inputs, and ``ok``: each
    within 4 rounding units of q's dtype at the scale of what it compares (both run the same arithmetic per tile, so
    they should agree to rounding: bitwise where the order of operations is the same); ``exact``: each equal, for a
    variant that computes the same values in the same order (a wrongly kept or dropped element is then seen however
    small)."""
    d_out = torch.randn(q.shape, generator=torch.Generator(device=q.device).manual_seed(7), device=q.device,
                        dtype=q.dtype)
    results = []
    for fn in (shipped, call):
        out = fn()
        results.append([out.detach().float(), *(g.float() for g in torch.autograd.grad(out, (q, k, v), d_out))])
    check, ok = {}, True
    for name, mine, expected in zip(("out", "dq", "dk", "dv"), results[1], results[0]):
        difference = float((mine - expected).abs().max())
        check[f"max_abs_diff_{name}"] = difference
        ok &= difference == 0 if exact else difference <= 4 * torch.finfo(q.dtype).eps * max(float(expected.abs().max()),
                                                                                              1e-6)
    call.check = dict(check, ok=bool(ok))
    return call


def _tte_with_tma(layout: Layout, q, k, v, options: dict, require_sm90: bool = True):
    """A callable of the TTE kernel that loads through TMA descriptors: the forward's and dQ's K/V and the dK/dV
    kernel's Q/dO (the shipped tiles with ``tma=True``), checked against the shipped kernel (:func:`_checked`): a
    ``fwd`` row times the forward's TMA alone, ``fwd+bwd`` all three kernels'. RuntimeError
    where TMA cannot run (not an sm_90 GPU; head dims over 128: compile_check checked the TMA forward at d64 and
    d128 only). ``require_sm90=False`` (tests): anywhere, the interpreter's TMA emulation included."""
    if require_sm90 and (q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] < 9):
        raise RuntimeError("TMA descriptors need an sm_90 (Hopper) GPU")
    if q.shape[-1] > 128:
        raise RuntimeError(f"the TMA forward was checked for head dims up to 128, not {q.shape[-1]}")
    # fwd and dQ: K/V, dK/dV: Q/dO
    return _tte_with_configs(layout, q, k, v, options, lambda name, config: config._replace(tma=True))


def _tte_with_pair_masks(layout: Layout, q, k, v, options: dict, require_cuda: bool = True):
    """A callable of the TTE kernel whose backward masks its partial tiles' 16-bit P / dS two elements an instruction
    (``KernelConfig.pair_mask``: packed fp16 compares in inline PTX) in the dQ kernel (head dims up to 128: at 256
    it spills) and the dK/dV kernel, checked against the shipped kernel (:func:`_checked`, exact: the same values):
    only its ``bwd`` and ``fwd+bwd`` rows differ from ``tte-triton``'s. RuntimeError where it cannot run (no CUDA
    GPU: inline PTX; not bf16 / fp16). ``require_cuda=False`` (tests): anywhere, the interpreter running the same
    fp16 compares with ``tl.where``."""
    if require_cuda and q.device.type != "cuda":
        raise RuntimeError("the pair masks are inline PTX: they need a CUDA GPU")
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(f"the pair masks mask 16-bit tiles: bf16 or fp16 inputs, not {q.dtype}")
    head_dim = q.shape[-1]
    return _tte_with_configs(layout, q, k, v, options, lambda name, config: config._replace(
        pair_mask=name == "dkdv" or (name == "dq" and head_dim <= 128)), exact=True)


def _tte_with_configs(layout: Layout, q, k, v, options: dict, change, exact: bool = False):
    """A callable of the TTE kernel with each launcher's config replaced by ``change(kernel name, shipped config)``
    (a :class:`KernelConfig` what-if on the shipped tiles), checked against the shipped kernel (:func:`_checked`,
    ``exact``: equal)."""
    from tte_flash.kernels import prepare_layout, tte_attention_with_layout
    kernel = _kernel_module()
    shipped = kernel._kernel_config

    def changed(kernel_name, dtype, head_dim, blocks=None):
        return change(kernel_name, shipped(kernel_name, dtype, head_dim, blocks))

    prepared = prepare_layout(layout.seq_ids, layout.token_types, **options)

    def under_change(launcher, *args, **kwargs):
        kernel._kernel_config = changed  # the launcher reads it at the call; restored at once
        try:
            return launcher(*args, **kwargs)
        finally:
            kernel._kernel_config = shipped

    class _Changed(torch.autograd.Function):  # both launchers under the changed configs
        @staticmethod
        def forward(ctx, q_, k_, v_):
            out, lse = under_change(kernel._attention_forward, q_, k_, v_, prepared, scale=q_.shape[-1] ** -0.5)
            ctx.save_for_backward(q_, k_, v_, out, lse)
            return out

        @staticmethod
        def backward(ctx, d_out):
            q_, k_, v_, out, lse = ctx.saved_tensors
            return under_change(kernel._attention_backward, d_out.contiguous(), q_, k_, v_, out, lse, prepared,
                                scale=q_.shape[-1] ** -0.5)

    def call():
        return _Changed.apply(q, k, v)
    return _checked(call, lambda: tte_attention_with_layout(q, k, v, prepared), q, k, v, exact)


def _tte_in_block_order(layout: Layout, q, k, v, options: dict):
    """A callable of the shipped kernel whose programs take their blocks in block order (program p, block p), not
    the block table's longest-first order: what launching the longest programs first buys (the model:
    ``block_table_build.py --schedule``). Checked against the shipped kernel (:func:`_checked`: same arithmetic per
    program, so equal)."""
    from tte_flash.kernels import prepare_layout, tte_attention_with_layout
    kernel = _kernel_module()
    shipped = prepare_layout(layout.seq_ids, layout.token_types, **options)
    prepared = prepare_layout(layout.seq_ids, layout.token_types, **options)
    for name in ("fwd", "dq", "dkdv"):  # the tables the launchers will ask for, built now with the orders replaced
        config = kernel._kernel_config(name, q.dtype, q.shape[-1])
        table = prepared.block_table(config.block_m, config.block_n)
        in_order = {side: torch.arange(getattr(table, side).numel(), dtype=torch.int32, device=q.device)
                    for side in ("row_order", "col_order")}
        prepared.tables[config.block_m, config.block_n] = table._replace(**in_order)
    return _checked(lambda: tte_attention_with_layout(q, k, v, prepared),
                    lambda: tte_attention_with_layout(q, k, v, shipped), q, k, v)


def fa2_varlen(q, k, v, cu_seqlens, longest: int):
    """A callable of FlashAttention-2 varlen (per-sample causal) on packed (T, H, D) tensors, tagged with the
    implementation that runs it (``.implementation``): flash-attn where installed, else PyTorch's built-in
    FlashAttention-2 kernels (``torch.nn.attention.varlen.varlen_attn``, else ``aten._flash_attention_forward``).
    Raises RuntimeError naming every implementation tried when none runs here (e.g. without CUDA)."""
    tried = []
    for name, make in _FA2_IMPLEMENTATIONS:
        try:
            fn, label = make(q, k, v, cu_seqlens, longest)
            fn()  # runs once here: a kernel that rejects these shapes falls through to the next implementation
        except Exception as error:  # ImportError, a missing op, a CUDA-only kernel on the CPU, a shape check
            first_line = (str(error).splitlines() or [""])[0]
            tried.append(f"{name}: {type(error).__name__}: {first_line[:160]}")
            continue
        fn.implementation = label
        return fn
    raise RuntimeError("no FlashAttention-2 varlen implementation runs here (" + "; ".join(tried) + ")")


def _fa2_flash_attn(q, k, v, cu_seqlens, longest):
    import flash_attn
    from flash_attn import flash_attn_varlen_func

    def call():
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, longest, longest, causal=True)
    return call, f"flash_attn.flash_attn_varlen_func (flash-attn {flash_attn.__version__})"


def _fa2_torch_varlen(q, k, v, cu_seqlens, longest):
    from torch.nn.attention.varlen import varlen_attn
    params = inspect.signature(varlen_attn).parameters
    # torch 2.9/2.10: is_causal=True; 2.11 and later: a (left, right) window, (-1, 0) being causal
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:
        causal["enable_gqa"] = True

    def call():
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest, **causal)
    return call, (f"torch.nn.attention.varlen.varlen_attn({', '.join(f'{k}={v}' for k, v in causal.items())}) "
                  f"(torch {torch.__version__}: PyTorch's FlashAttention-2 kernels; flash-attn not installed)")


def _fa2_aten(q, k, v, cu_seqlens, longest):
    op = torch.ops.aten._flash_attention_forward

    def call():
        return op(q, k, v, cu_seqlens, cu_seqlens, longest, longest, 0.0, True, False)[0]
    return call, (f"torch.ops.aten._flash_attention_forward(is_causal=True) (torch {torch.__version__}: "
                  "PyTorch's FlashAttention-2 kernels; flash-attn and torch.nn.attention.varlen absent)")


_FA2_IMPLEMENTATIONS = (("flash_attn", _fa2_flash_attn), ("torch.nn.attention.varlen", _fa2_torch_varlen),
                        ("aten._flash_attention_forward", _fa2_aten))

_FLEX = {}


def _compiled_flex(flex_attention):
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    return _FLEX["fn"]


# ----------------------------------------------------------------------------------------------------
# Tile accounting: the previous scheme against the block table, on the CPU
# ----------------------------------------------------------------------------------------------------

# (kernel, BLOCK_M, BLOCK_N, the side a program owns): the shipped sm_90 bf16/fp16 head-dim-128 configs, and
# FlexAttention's default 128 x 128 block for comparison with its block count
TILE_SHAPES = (("fwd", 128, 64, "rows"), ("dq", 128, 32, "rows"), ("dkdv", 32, 128, "keys"),
               ("flex-128", 128, 128, "rows"))


def _old_scheme_tiles(prepared, block_m, block_n, side):
    """(row block, key block) of every tile the previous kernels visited, and whether they masked it.

    A program owning a row block scanned keys [min kv_lo rounded down to a key block, max kv_hi) of its
    rows (a key-block program: rows [min q_lo rounded down, max q_hi)); a tile was mask-free only if all
    its rows and keys were in one sample, its keys preceded its first row, and no (COT row, EMB key) or,
    without cot_sees_query, (COT row, QUERY key) pair could be in it (from the end tokens' seq ids/types).
    """
    tokens = prepared.seq_ids.numel()
    own, other = (block_m, block_n) if side == "rows" else (block_n, block_m)
    lo, hi = (prepared.kv_lo, prepared.kv_hi) if side == "rows" else (prepared.q_lo, prepared.q_hi)
    owners = -(-tokens // own)
    pad = owners * own - tokens
    lo = torch.cat([lo.long(), lo.new_full((pad,), tokens).long()]).view(owners, own).min(1).values // other * other
    hi = torch.cat([hi.long(), hi.new_zeros(pad).long()]).view(owners, own).max(1).values
    steps = (hi - lo + other - 1).clamp(min=0) // other  # (owners,)
    owner = torch.repeat_interleave(torch.arange(owners), steps)
    start = torch.cumsum(steps, 0) - steps
    other_block = lo[owner] // other + torch.arange(owner.numel()) - start[owner]
    row_block, key_block = (owner, other_block) if side == "rows" else (other_block, owner)
    m0, n0 = row_block * block_m, key_block * block_n
    seq, types = prepared.seq_ids.long(), prepared.token_types.long()
    m_last, n_last = (m0 + block_m).clamp(max=tokens) - 1, (n0 + block_n).clamp(max=tokens) - 1
    row_cot = types[m_last] == COT
    full = (m0 + block_m <= tokens) & (n0 + block_n - 1 <= m0) & (seq[n0] == seq[m_last])
    full &= ~(row_cot & (types[n0] <= EMB) & (types[n_last] >= EMB))
    if not prepared.cot_sees_query:
        full &= ~(row_cot & (types[n0] == QUERY))
    return row_block, key_block, ~full


def tile_counts(layout: Layout, options: dict) -> list[dict]:
    """Tile counts of one layout for each shape in TILE_SHAPES, previous scheme and block table."""
    from tte_flash.kernels import prepare_layout
    from tte_flash.kernels.block_table import tile_counts as table_counts, tile_pairs, tiles
    prepared = prepare_layout(layout.seq_ids.cpu(), layout.token_types.cpu(), **options)
    rows = []
    for kernel, block_m, block_n, side in TILE_SHAPES:
        table = prepared.block_table(block_m, block_n)
        key_blocks = -(-layout.tokens // block_n)
        # exact visible pairs of every non-empty tile (the table is checked against the dense mask in tests)
        table_rows, table_keys, _ = tiles(table)
        pairs = tile_pairs(table_rows, table_keys, prepared.q_lo, prepared.q_hi, block_m, block_n)
        pairs_of = dict(zip((table_rows * key_blocks + table_keys).tolist(), pairs.tolist()))
        row_block, key_block, masked = _old_scheme_tiles(prepared, block_m, block_n, side)
        old_pairs = torch.tensor([pairs_of.get(t, 0) for t in (row_block * key_blocks + key_block).tolist()])
        visited = int(masked.numel())
        old = dict(visited=visited, with_visible_pair=int((old_pairs > 0).sum()), partial=int(masked.sum()),
                   full=int((~masked).sum()), visible_pairs=int(old_pairs.sum()),
                   visible_over_computed=int(old_pairs.sum()) / (visited * block_m * block_n),
                   metadata_loads_per_tile=5 + 2 * int(masked.sum()) / visited)
        new = {k: v for k, v in table_counts(table).items() if k not in ("block_m", "block_n")}
        new["metadata_loads_per_tile"] = 0.0  # 8 range bounds per program, none per tile
        for scheme, counts in (("previous", old), ("block-table", new)):
            rows.append(dict(layout=layout.name, tokens=layout.tokens, samples=len(layout.samples), kernel=kernel,
                             block_m=block_m, block_n=block_n, program_owns=side, scheme=scheme, **counts, **options))
    return rows


def print_tile_table(rows: list[dict]) -> None:
    print(f"{'layout':7} {'tokens':>6} {'kernel':8} {'blocks':>7} {'scheme':11} {'visited':>7} {'w/ pair':>7} "
          f"{'partial':>7} {'full':>6} {'%partial':>8} {'vis/comp':>8} {'meta/tile':>9}")
    for r in rows:
        print(f"{r['layout']:7} {r['tokens']:6d} {r['kernel']:8} {r['block_m']:>3}x{r['block_n']:<3} {r['scheme']:11} "
              f"{r['visited']:7d} {r['with_visible_pair']:7d} {r['partial']:7d} {r['full']:6d} "
              f"{100 * r['partial'] / max(r['visited'], 1):7.1f}% {r['visible_over_computed']:8.3f} "
              f"{r['metadata_loads_per_tile']:9.2f}")


def run_tile_counts(args) -> list[dict]:
    options = dict(think_bidirectional=args.think_bidirectional, cot_sees_query=not args.cot_hides_query)
    environment = dict(**versions(), commit=git_commit(), date=datetime.datetime.now().isoformat(timespec="seconds"))
    rows = []
    for layout_name in args.layouts:
        for tokens in args.tokens:
            layout = make_layout(layout_name, tokens, "cpu", args.tiny)
            rows += [dict(row, **environment) for row in tile_counts(layout, options)]
    return rows


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------

def mode_callable(fn, mode: str, inputs):
    """The callable timed for ``mode``: the forward, the backward of one retained graph, or both."""
    if mode == "fwd":
        return fn
    d_out = torch.randn_like(fn())
    if mode == "bwd":
        out = fn()
        return lambda: torch.autograd.grad(out, inputs, d_out, retain_graph=True)
    return lambda: torch.autograd.grad(fn(), inputs, d_out)


def measure(fn, device, warmup: int, repeats: int):
    """(p20, p50, p80) milliseconds and peak MB above the starting allocation (None on the CPU)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    peak_mb = None
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak_mb = (torch.cuda.max_memory_allocated(device) - start_bytes) / 2**20
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    p20, p50, p80 = np.percentile(times, [20, 50, 80])
    return float(p20), float(p50), float(p80), peak_mb


def append_jsonl(path, row: dict) -> None:
    """Append one row to a JSON-lines file and flush it to disk (a process killed later keeps it)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    options = dict(think_bidirectional=args.think_bidirectional, cot_sees_query=not args.cot_hides_query)
    environment = dict(device=device_name(device), **versions(), commit=git_commit(),
                       date=datetime.datetime.now().isoformat(timespec="seconds"))
    rows = []
    for layout_name in args.layouts:
        for tokens in args.tokens:
            layout = make_layout(layout_name, tokens, device, args.tiny)
            pairs = {"tte": visible_pairs(layout, options), "causal": causal_pairs(layout)}
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(tokens, heads, args.head_dim, device=device, dtype=dtype, generator=gen)
                       .requires_grad_() for heads in (args.q_heads, args.kv_heads, args.kv_heads))
            case = dict(kernel="tte_attention", layout=layout_name, tokens=tokens, samples=len(layout.samples),
                        dtype=args.dtype, q_heads=args.q_heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                        **options)
            for provider in args.providers:
                try:
                    fn = setup(provider, layout, q, k, v, options)
                except Exception as error:  # missing, CUDA-only, or a variant's first launch (a Triton compile error)
                    print(f"skip {provider} ({layout_name}, {tokens} tokens): {error}")
                    append_jsonl(args.jsonl, dict(case, provider=provider, mode=None, status="unavailable",
                                                  reason=f"{type(error).__name__}: {error}", **environment))
                    continue
                implementation = getattr(fn, "implementation", None)
                check = getattr(fn, "check", None)  # a tte-triton-* variant, checked against the shipped kernel
                if check is not None and not check["ok"]:
                    print(f"WRONG RESULTS {provider} ({layout_name}, {tokens} tokens): {check}")
                    append_jsonl(args.jsonl, dict(case, provider=provider, mode=None, status="wrong-results",
                                                  check=check, **environment))
                    continue
                for mode in args.modes:
                    print(f"{layout_name} {tokens} tokens: {provider} {mode} ...", file=sys.stderr, flush=True)
                    started = time.perf_counter()
                    try:
                        p20, p50, p80, peak_mb = measure(mode_callable(fn, mode, (q, k, v)), device, args.warmup,
                                                         args.repeats)
                    except Exception as error:  # a compile failure (Triton's errors are no RuntimeError), OOM
                        print(f"skip {provider} {mode} ({layout_name}, {tokens} tokens): {error}")
                        append_jsonl(args.jsonl, dict(case, provider=provider, mode=mode, status="failed",
                                                      implementation=implementation,
                                                      reason=f"{type(error).__name__}: {error}"[:2000], **environment))
                        continue
                    useful = pairs["causal" if provider == "fa2-varlen" else "tte"]
                    flops = 4 * args.head_dim * useful * args.q_heads * FLOP_FACTOR[mode]
                    row = dict(case, provider=provider, mode=mode, status="ok", implementation=implementation,
                               **({"check": check} if check is not None else {}),
                               visible_pairs=useful, ms_p20=p20, ms_p50=p50, ms_p80=p80,
                               tflops=flops / (p50 * 1e-3) / 1e12, peak_mem_mb=peak_mb,
                               seconds_with_warmup=round(time.perf_counter() - started, 2), **environment)
                    rows.append(row)
                    append_jsonl(args.jsonl, row)
    return rows


def print_table(rows: list[dict]) -> None:
    """One line per (layout, tokens, mode, provider); ``tte_x`` = TTE TFLOP/s over this provider's."""
    tte = {(r["layout"], r["tokens"], r["mode"]): r["tflops"] for r in rows if r["provider"] == "tte-triton"}
    print(f"{'layout':7} {'tokens':>7} {'mode':8} {'provider':14} {'ms p50':>9} {'TFLOP/s':>8} {'peak MB':>9} "
          f"{'tte_x':>6}")
    for r in rows:
        reference = tte.get((r["layout"], r["tokens"], r["mode"]))
        ratio = f"{reference / r['tflops']:6.2f}" if reference else "     -"
        peak = f"{r['peak_mem_mb']:9.1f}" if r["peak_mem_mb"] is not None else "        -"
        print(f"{r['layout']:7} {r['tokens']:7d} {r['mode']:8} {r['provider']:14} {r['ms_p50']:9.3f} "
              f"{r['tflops']:8.2f} {peak} {ratio}")
    for implementation in sorted({r["implementation"] for r in rows if r.get("implementation")}):
        print(f"fa2-varlen ran as {implementation}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes (48 tokens, 2/1 heads, head_dim 16, fp32, TTE and SDPA unless --providers "
                             "names others): exercises "
                             "the code path on the CPU under the Triton interpreter; timings mean nothing")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--layouts", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(DEFAULT_PROVIDERS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--q-heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--think-bidirectional", action="store_true")
    parser.add_argument("--cot-hides-query", action="store_true", help="cot_sees_query=False")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", type=Path, help="JSON rows (default benchmarks/results/attention-<device>-<date>"
                                                    ".json, attention-tiles-cpu-<date>.json with --tile-counts)")
    parser.add_argument("--jsonl", type=Path, default=None,
                        help="also append each row to this JSON-lines file as soon as it is measured (and a row with "
                             "the reason for each provider that is unavailable or fails)")
    parser.add_argument("--tile-counts", action="store_true",
                        help="count the tiles the kernels visit (previous scheme and block table) on the CPU; "
                             "no kernel runs")
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(given)
    if args.tile_counts:  # arithmetic on the layout only: full sizes are cheap anywhere
        return args
    if torch.device(args.device).type == "cpu" and not args.tiny and not any(a.startswith("--tokens") for a in given):
        print("CPU: tiny sizes (--tiny): full-size layouts take many minutes each under the Triton interpreter; "
              "pass --tokens to run them anyway", file=sys.stderr)
        args.tiny = True
    if args.tiny:
        args.tokens, args.q_heads, args.kv_heads, args.head_dim = [48], 2, 1, 16
        args.dtype, args.warmup, args.repeats = "float32", 1, 2
        if not any(a.startswith("--providers") for a in given):  # named ones run (and say why they cannot)
            args.providers = [p for p in args.providers if p in ("tte-triton", "sdpa-dense")]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.tile_counts:
        rows = run_tile_counts(args)
        print_tile_table(rows)
        output = args.output or default_results_path("attention-tiles", torch.device("cpu"))
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(rows, indent=1))
        print(f"wrote {len(rows)} rows to {output}")
        return rows
    if torch.device(args.device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu needs TRITON_INTERPRET=1 set before triton is imported")
    rows = run(args)
    print_table(rows)
    output = args.output or default_results_path("attention", torch.device(args.device))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(rows, indent=1))
    print(f"wrote {len(rows)} rows to {output}")
    return rows


if __name__ == "__main__":
    main()
