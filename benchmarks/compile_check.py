"""Compile gate for the Triton kernels: every kernel x shipped config, compiled for sm_90 and sm_80 (and on request
sm_86, sm_89, sm_100, sm_120) without a GPU.

Triton compiles for a target with no driver (DESIGN.md §11): this script drives the kernels' own launchers
(``_attention_forward`` / ``_attention_backward``) on CPU tensors of real shape with a stand-in driver that
reports the target, intercepts every launch before compilation (so the signature, constexprs, alignment
specialisation and autotune configs are exactly those of a real launch), then compiles each one with
``triton.compile`` and reads the result: registers, spill bytes and stack frame (from the ``ptxas -v`` log of
Triton's own ptxas), shared memory (kernel metadata) and whether the TTGIR uses wgmma (Hopper tensor cores), and the
SASS instructions per tile of each tile kind's loop (``nvdisasm``; :func:`sass_tile_loops`): the full tile's and each
partial kind's (cut_lo, cut_hi, cut_lo_hi, cut_any: ``kernels/block_table.py``), their largest ratios in the summary.

It fails (exit status 1) on a compile error, a spill in a shipped (16-bit) config on any target, an sm_90 16-bit
launch without wgmma or an sm_100 one without tcgen05 (Blackwell's tensor-core MMA), a ptxas warning C7515 (wgmma
serialised), or shared memory over the target's per-block limit (fp32 and fp64 spills are reported, not gated).
``--targets`` takes 80 and 90 (the default) and 86, 89, 100 and 120: the kernels pick their tiles by GPU family
(``_gpu_family`` in the kernel module). It also takes 75 (T4, RTX 20xx) to show why the kernels refuse GPUs below
compute capability 8.0 (``unsupported_gpu``): Triton compiles no tensor-core dot there, so every launch fails it. ``--also-triton DIR`` compiles every launch again with the Triton in
DIR (the H200 image has Triton 3.6, this machine 3.9): ``pip install --no-deps triton==3.6.0 --target DIR``.

    python benchmarks/compile_check.py                 # CI subset: bf16/fp16 x head dim 64/128, default flags, both targets
    python benchmarks/compile_check.py --full          # also every mask-flag combination
    python benchmarks/compile_check.py --full --json benchmarks/results/compile-<date>.json
    pip install --no-deps triton==3.6.0 --target /tmp/triton36     # the H200 image's Triton, beside this one
    python benchmarks/compile_check.py --head-dims 64 128 256 --targets 90 --also-triton /tmp/triton36
    python benchmarks/compile_check.py --targets 80 86 89 90 100 120 --head-dims 64 128 256   # every GPU family

Runs on any Linux machine with the triton wheel (ptxas ships in it); ``TRITON_INTERPRET`` must be unset.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

KERNEL_MODULE = "tte_flash.kernels.tte_attention"
# Per-block shared memory a kernel may use (opt-in maximum), by compute capability: H100/H200 and B200 227 KiB,
# A100 163 KiB, the 99 KiB of sm_86 (A10, A40, RTX 30xx), sm_89 (L4, L40S, RTX 40xx) and sm_120 (RTX 50xx, RTX PRO
# Blackwell), T4's 64 KiB. sm_90 and sm_80 are the gate's default targets; the others are compiled on request
# (--targets; sm_75 only as the evidence that the kernels refuse it).
SMEM_LIMIT = {90: 232448, 80: 166912, 86: 101376, 89: 101376, 100: 232448, 120: 101376, 75: 65536}
SHIPPED_DTYPES = ("bfloat16", "float16")


@dataclass
class Case:
    """Which launch: kernel, target (compute capability), dtype, head dim, mask flags, block config."""
    kernel: str
    target: int
    dtype: str
    head_dim: int
    flags: str
    config: str


@dataclass
class Job(Case):
    """One kernel launch to compile: what the launcher passed, as Triton's JIT would have compiled it."""
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


@dataclass
class Result(Case):
    ok: bool = False
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_frame: int | None = None
    shared: int | None = None
    wgmma: bool | None = None
    tcgen05: bool | None = None  # Blackwell's tensor-core MMA (ttng.tc_gen5_mma in the TTGIR)
    c7515: int | None = None  # ptxas warnings C7515: wgmma serialised (an accumulator live across loops, ...)
    sass_full: float | None = None  # SASS instructions per tile of the mask-free (full-tile) loop body
    sass_kinds: dict = field(default_factory=dict)  # the same per partial-tile kind (cut_lo, cut_hi, cut_lo_hi, ...)
    ptxas_warnings: list = field(default_factory=list)  # every ptxas warning line, as ptxas wrote it
    triton: str | None = None  # the Triton version that compiled it
    seconds: float | None = None
    error: str | None = None
    problems: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Capture: run the launchers with a stand-in driver and stop every launch before it compiles
# ---------------------------------------------------------------------------------------------------------------

class _TargetOnlyDriver:
    """Enough of a Triton driver for the JIT to specialise and pack arguments for ``target`` (no device)."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", capability, 32)
        self.capability = capability

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.capability  # a distinct "device" per target keeps the JIT's per-device caches apart

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")


def _sample_layout(mask_module):
    """A packed layout with every token type, two samples and odd lengths (the launchers need a real one)."""
    import torch
    spans = [(mask_module.QUERY, 37), (mask_module.THINK, 16), (mask_module.EMB, 1), (mask_module.COT, 29),
             (mask_module.QUERY, 53), (mask_module.THINK, 16), (mask_module.EMB, 1)]
    types = torch.cat([torch.full((n,), t, dtype=torch.long) for t, n in spans])
    seq = torch.cat([torch.full((37 + 16 + 1 + 29,), 0), torch.full((53 + 16 + 1,), 1)]).long()
    return seq, types


@contextlib.contextmanager
def _intercepted(capability: int, sink: list):
    """Patch Triton so launches record (fn, signature, constexprs, options, attrs) instead of compiling."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        sink.append((self, signature, constexprs, options, attrs))
        return None  # the JIT then returns without launching

    def every_config(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        grid = kwargs.pop("grid")
        for config in self.configs:  # every autotune config is a shipped config
            self.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())

    saved = JITFunction._do_compile, Autotuner.run
    previous = driver._active  # None on a machine without a GPU (no default driver can be created)
    driver.set_active(_TargetOnlyDriver(capability))
    JITFunction._do_compile, Autotuner.run = record, every_config
    try:
        yield
    finally:
        JITFunction._do_compile, Autotuner.run = saved
        driver._active = previous


def _config_label(fn, constexprs, options) -> str:
    """``BLOCK_MxBLOCK_N w<warps> s<stages>`` of a launch, from its constexprs (fixed or autotuned alike)."""
    names = [p.name for p in fn.params]
    named = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    blocks = "x".join(str(named[k]) for k in ("BLOCK_M", "BLOCK_N") if k in named) or "-"
    grads = "".join(name for name, flag in (("dK", "WITH_DK"), ("dV", "WITH_DV")) if named.get(flag))
    part = f" {grads}" if grads in ("dK", "dV") else ""  # one of the two launches of a split dK/dV
    flags = (("tma", "TMA"), ("ws", "WARP_SPECIALIZE"), ("pairs", "PAIR_MASK"))
    part += "".join(f" {label}" for label, flag in flags if named.get(flag))
    return f"{blocks} w{options.num_warps} s{options.num_stages}{part}"


def parse_config(text: str):
    """``dkdv=64x32/w4/s2`` -> ("dkdv", (64, 32, 4, 2, 1)): a what-if launch config (``--config``); a dK/dV config
    may end in ``/l2`` (dV and dK in two launches), any in ``/tma`` (the forward's and dQ's K/V, the dK/dV kernel's
    Q/dO by TMA descriptors), a forward one in ``/ws`` (warp-specialised tile loops), a backward one in ``/pairs``
    (16-bit P / dS masked two elements an instruction): (..., tma, warp_specialize, pair_mask) appended."""
    match = re.fullmatch(r"(fwd|dq|dkdv)=(\d+)x(\d+)/w(\d+)/s(\d+)(?:/l([12]))?(/tma)?(/ws)?(/pairs)?", text)
    if not match or (match.group(1) != "fwd" and match.group(8)) or (match.group(1) == "fwd" and match.group(9)):
        raise argparse.ArgumentTypeError("expected KERNEL=BLOCK_MxBLOCK_N/wWARPS/sSTAGES[/lLAUNCHES][/tma][/ws][/pairs] "
                                         f"(KERNEL in fwd, dq, dkdv; /ws: fwd only; /pairs: dq, dkdv only), got {text!r}")
    name, *numbers, tma, ws, pairs = match.groups()
    config = tuple(int(x) for x in numbers[:4]) + (int(numbers[4] or 1),)
    return name, config + ((bool(tma), bool(ws), bool(pairs)) if tma or ws or pairs else ())


@contextlib.contextmanager
def _configs_replaced(kernels, replaced: dict):
    """The launchers use ``replaced[kernel name]`` (a KernelConfig tuple) instead of the shipped config."""
    shipped = kernels._kernel_config

    def what_if(kernel_name, dtype, head_dim, blocks=None):
        if kernel_name in replaced:
            return kernels.KernelConfig(*replaced[kernel_name])
        return shipped(kernel_name, dtype, head_dim, blocks)

    kernels._kernel_config = what_if
    try:
        yield
    finally:
        kernels._kernel_config = shipped


def capture(capabilities, dtypes, head_dims, flag_sets, replaced=None) -> list[Job]:
    """Every launch the forward and backward launchers make, per target x dtype x head dim x flags (with the
    kernels' configs in ``replaced``, {name: (BLOCK_M, BLOCK_N, warps, stages)}, instead of the shipped ones)."""
    os.environ.pop("TRITON_INTERPRET", None)
    kernels = importlib.import_module(KERNEL_MODULE)
    if getattr(kernels, "_INTERPRET", False):
        raise SystemExit("compile_check: TRITON_INTERPRET=1 was set when the kernels were imported; unset it")
    with _configs_replaced(kernels, dict(replaced or {})):
        return _capture(kernels, capabilities, dtypes, head_dims, flag_sets)


def run_launchers(kernels, dtype, head_dim: int, think_bidirectional=False, cot_sees_query=True) -> None:
    """Every launch of the forward and the backward launchers on the sample layout (12 query heads, 2 KV heads),
    for a caller that stops each launch before it runs: the launchers return empty buffers then (nothing ran);
    shapes and dtypes are all that matter."""
    import torch
    seq, types = _sample_layout(importlib.import_module("tte_flash.mask"))
    layout = kernels.prepare_layout(seq, types, think_bidirectional=think_bidirectional,
                                    cot_sees_query=cot_sees_query)
    tokens = seq.numel()
    q = torch.randn(tokens, 12, head_dim, dtype=dtype)
    k, v = torch.randn(tokens, 2, head_dim, dtype=dtype), torch.randn(tokens, 2, head_dim, dtype=dtype)
    out, lse = kernels._attention_forward(q, k, v, layout, scale=head_dim ** -0.5)
    kernels._attention_backward(torch.randn_like(q), q, k, v, out, lse, layout, scale=head_dim ** -0.5)


def _capture(kernels, capabilities, dtypes, head_dims, flag_sets) -> list[Job]:
    import torch
    jobs = []
    for cc, dtype_name, head_dim, (think_bidirectional, cot_sees_query) in itertools.product(
            capabilities, dtypes, head_dims, flag_sets):
        flags = f"{'bidir' if think_bidirectional else 'causal'}/{'cot+q' if cot_sees_query else 'cot-q'}"
        sink: list = []
        with _intercepted(cc, sink):
            run_launchers(kernels, getattr(torch, dtype_name), head_dim, think_bidirectional, cot_sees_query)
        for entry in sink:
            fn, signature, constexprs, options, attrs = entry
            jobs.append(Job(kernel=fn.__name__, target=cc, dtype=dtype_name, head_dim=head_dim, flags=flags,
                            config=_config_label(fn, constexprs, options), signature=dict(signature),
                            constexprs=dict(constexprs), attrs=dict(attrs), options=dict(options.__dict__)))
    return jobs


# ---------------------------------------------------------------------------------------------------------------
# Compile one job (in a worker process: an LLVM abort kills the worker, not the gate)
# ---------------------------------------------------------------------------------------------------------------

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")
_PTXAS_C7515 = re.compile(r"C7515")


_SASS_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_SASS_MATH = re.compile(r"^(?:@!?U?P\w+\s+)?(?:HGMMA|HMMA|IMMA|DMMA|FFMA|DFMA|FMUL|DMUL)\b")  # a tile's arithmetic
_SASS_LINE = re.compile(r'//## File "(.+?)", line (\d+)(?: inlined at "(.+?)", line (\d+))?')


def mask_kind_lines(path: str, namespace: dict) -> dict:
    """Where the kernels in ``path`` say which tile kind a line serves: ``tiles``, the lines of the functions that
    take a ``MASK`` parameter (the kernels' tile loops and mask tests); ``kinds``, {line: kind} of the body of every
    ``if MASK == NAME:`` (or ``elif``), NAME evaluated in ``namespace`` (the kernel module's globals; a
    ``tl.constexpr`` counts as its value). Each kind's mask tests sit in such a branch (``_rows_see``), and a
    mask-free loop runs none of them. Other tests of ``MASK`` (``!=``, ``or``) are shared by several kinds: ignored."""
    import ast
    tree = ast.parse(Path(path).read_text())
    tiles, kinds = set(), {}
    for f in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        if "MASK" in [a.arg for a in f.args.args]:
            tiles.update(range(f.lineno, f.end_lineno + 1))
    for branch in (n for n in ast.walk(tree) if isinstance(n, ast.If)):
        test = branch.test
        if not (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "MASK"
                and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
            continue
        value = eval(compile(ast.Expression(test.comparators[0]), path, "eval"), dict(namespace))  # noqa: S307
        for statement in branch.body:
            kinds.update(dict.fromkeys(range(statement.lineno, statement.end_lineno + 1), int(getattr(value, "value",
                                                                                                          value))))
    return {"tiles": tiles, "kinds": kinds}


def sass_tile_loops(sass: str, source: str, lines: dict, full: int = 0) -> dict:
    """SASS instructions per tile of each tile kind's loop, {kind: count}, from ``nvdisasm -c -gi`` output.

    A tile loop is an innermost SASS loop (a backward branch) that does arithmetic (an MMA, FMA or FMUL: a TMA
    barrier's wait loop inside a tile loop does none, and is neither counted nor makes the tile loop an outer
    one); the body's instructions are counted once, wait loop included. Its kind is the one
    whose ``if MASK == kind:`` lines (``lines["kinds"]``, :func:`mask_kind_lines`) it runs, or ``full`` where it runs
    none of them but runs lines of a tile function (``lines["tiles"]``); a loop that runs the lines of two kinds is
    left out. The line info of each instruction is the ``//## File ..., line N [inlined at ..., line M]`` comments
    before it (every line of ``source`` they name: Triton 3.9 names the inlining chain, 3.6 the innermost line). One
    iteration is one tile, so its instruction count is the per-tile cost (the steady state of a pipelined loop;
    several loops of one kind, e.g. a kind's two unrolled ranges: the mean)."""
    instructions, labels, branches, current, group_open = [], {}, [], set(), False
    pending_labels = []
    for text in sass.splitlines():
        line = _SASS_LINE.search(text)
        if line:
            if not group_open:
                current, group_open = set(), True
            for file, number in ((line.group(1), line.group(2)), (line.group(3), line.group(4))):
                if file == source:
                    current.add(int(number))
            continue
        label = _SASS_LABEL.match(text)
        if label:
            pending_labels.append(label.group(1))
            continue
        instruction = _SASS_INSTRUCTION.match(text)
        if not instruction:
            continue
        group_open = False
        address = int(instruction.group(1), 16)
        for name in pending_labels:
            labels[name] = address
        pending_labels = []
        instructions.append((address, frozenset(current), bool(_SASS_MATH.search(instruction.group(2)))))
        branch = _SASS_BRANCH.search(instruction.group(2))
        if branch:
            branches.append((address, branch.group(1)))
    loops = {(labels[target], address) for address, target in branches
             if target in labels and labels[target] < address}
    # a tile loop does math (a wait loop on a TMA barrier inside it does not, and does not make it an outer loop)
    loops = {(s, e) for s, e in loops if any(math for address, _, math in instructions if s <= address <= e)}
    innermost = [(s, e) for s, e in loops if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in loops)]
    counts: dict = {}
    for start, end in sorted(innermost):
        body = [seen for address, seen, _ in instructions if start <= address <= end]
        seen_lines = set().union(*body)
        kinds = {lines["kinds"][n] for n in seen_lines if n in lines["kinds"]}
        if not kinds and seen_lines & lines["tiles"]:
            kinds = {full}
        if len(kinds) == 1:
            counts.setdefault(kinds.pop(), []).append(len(body))
    return {kind: round(sum(xs) / len(xs), 1) for kind, xs in sorted(counts.items())}


def _sass_counts(fn, cubin: bytes) -> dict:
    """Per-tile SASS instructions of the compiled kernel (nvdisasm of Triton's own CUDA tools)."""
    import inspect
    import tempfile
    from triton import knobs
    source = inspect.getsourcefile(fn.fn)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", "-gi", f.name], capture_output=True, text=True,
                              check=True).stdout
    kernels = importlib.import_module(KERNEL_MODULE)
    per_kind = sass_tile_loops(sass, source, mask_kind_lines(source, vars(kernels)), full=int(kernels.FULL))
    names = importlib.import_module("tte_flash.kernels.block_table").KIND_NAMES
    return {names[kind]: count for kind, count in per_kind.items()}


def compile_job(job: Job) -> Result:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = Result(**{f.name: getattr(job, f.name) for f in fields(Case)})
    result.triton = triton.__version__
    fn = getattr(importlib.import_module(KERNEL_MODULE), job.kernel)
    knobs.compilation.always_compile = True  # the ptxas log below comes only from a real compile
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.disable_line_info = False  # the SASS tile-loop counts read the line info
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs),
                                      target=GPUTarget("cuda", job.target, 32), options=job.options)
    except Exception as exc:  # a compile error is a result, not a crash of the gate
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        result.problems.append("compile error")
        return result
    result.seconds = round(time.perf_counter() - start, 2)
    text = log.getvalue()
    used, spill, stack = _PTXAS_USED.search(text), _PTXAS_SPILL.search(text), _PTXAS_STACK.search(text)
    result.registers = int(used.group(1)) if used else None
    if spill:
        result.spill_stores, result.spill_loads = int(spill.group(1)), int(spill.group(2))
    result.stack_frame = int(stack.group(1)) if stack else None
    result.shared = int(compiled.metadata.shared)
    result.wgmma = "warp_group_dot" in compiled.asm.get("ttgir", "")
    result.tcgen05 = "tc_gen5_mma" in compiled.asm.get("ttgir", "")
    result.c7515 = len(_PTXAS_C7515.findall(text))
    result.ptxas_warnings = [line.strip() for line in text.splitlines() if "warning" in line.lower()]
    try:
        sass = _sass_counts(fn, compiled.asm["cubin"])
        result.sass_full = sass.pop("full", None)
        result.sass_kinds = sass
    except (OSError, subprocess.CalledProcessError) as exc:  # no nvdisasm: the counts stay unknown
        result.ptxas_warnings.append(f"nvdisasm failed: {exc}")
    result.ok = True
    if used is None or spill is None:
        result.problems.append("no ptxas -v log")
    if result.shared > SMEM_LIMIT[job.target]:
        result.problems.append(f"shared memory {result.shared} > {SMEM_LIMIT[job.target]}")
    if job.dtype in SHIPPED_DTYPES and (result.spill_stores or result.spill_loads):
        result.problems.append(f"spills on sm_{job.target}")
    if job.target == 90 and job.dtype in SHIPPED_DTYPES and not result.wgmma:
        result.problems.append("no wgmma on sm_90")
    if job.target == 100 and job.dtype in SHIPPED_DTYPES and not result.tcgen05:
        result.problems.append("no tcgen05 on sm_100")
    if result.c7515:
        result.problems.append("wgmma serialised (ptxas C7515)")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

SASS_KINDS = ("cut_lo", "cut_hi", "cut_lo_hi", "cut_any")  # partial-tile kinds (kernels/block_table.py)


def sass_ratios(r: Result):
    """(largest of the one-bound kinds cut_lo / cut_hi, largest of every partial kind) over the full tile's count."""
    if not r.sass_full or not r.sass_kinds:
        return None, None
    one = [r.sass_kinds[k] for k in ("cut_lo", "cut_hi") if k in r.sass_kinds]
    return (round(max(one) / r.sass_full, 2) if one else None), round(max(r.sass_kinds.values()) / r.sass_full, 2)


def print_table(results: list[Result]) -> None:
    head = f"{'triton':<7} {'kernel':<18} {'sm':>3} {'dtype':<9} {'d':>4} {'flags':<13} {'config':<16} {'regs':>4} " \
           f"{'spill st/ld':>11} {'stack':>6} {'smem KiB':>8} {'wgmma':>5} {'SASS/tile full|lo/hi/lohi/any':>30} " \
           f"{'1cut/f':>6} {'max/f':>6}  problems"
    print(head)
    print("-" * len(head))
    for r in sorted(results, key=lambda r: (r.triton or "", r.kernel, -r.target, r.dtype, r.head_dim, r.flags,
                                            r.config)):
        spill = f"{r.spill_stores}/{r.spill_loads}" if r.spill_stores is not None else "-"
        smem = f"{r.shared / 1024:.1f}" if r.shared is not None else "-"
        problems = "; ".join(r.problems) + (f" ({r.error})" if r.error else "")
        kinds = "/".join(f"{r.sass_kinds[k]:g}" if k in r.sass_kinds else "-" for k in SASS_KINDS)
        sass = f"{r.sass_full or '-':g}|{kinds}" if r.sass_full else f"-|{kinds}"
        one_cut, worst = (f"{x:.2f}" if x else "-" for x in sass_ratios(r))
        print(f"{r.triton or '-':<7} {r.kernel:<18} {r.target:>3} {r.dtype:<9} {r.head_dim:>4} {r.flags:<13} {r.config:<16} "
              f"{r.registers if r.registers is not None else '-':>4} {spill:>11} "
              f"{r.stack_frame if r.stack_frame is not None else '-':>6} {smem:>8} "
              f"{'yes' if r.wgmma else 'tc05' if r.tcgen05 else 'no':>5} {sass:>30} {one_cut:>6} {worst:>6}  "
              f"{problems}")


def summary(results: list[Result]) -> dict:
    failed = [r for r in results if r.problems]
    return {"compiled": sum(r.ok for r in results), "total": len(results),
            "compile_errors": sum(r.error is not None for r in results),
            "sm90_spills_shipped": sum("spills on sm_90" in r.problems for r in results),
            "spills_shipped": sum(any(p.startswith("spills on sm_") for p in r.problems) for r in results),
            "smem_over_limit": sum(any(p.startswith("shared memory") for p in r.problems) for r in results),
            "sm80_spilling_configs": sum(r.target == 80 and bool(r.spill_stores) for r in results),
            "spilling_configs_by_target": {t: sum(r.target == t and bool(r.spill_stores) for r in results)
                                           for t in sorted({r.target for r in results if r.target})},
            "wgmma_on_sm90_16bit": sum(r.target == 90 and r.dtype in SHIPPED_DTYPES and bool(r.wgmma)
                                       for r in results),
            "no_wgmma_on_sm90_16bit": sum("no wgmma on sm_90" in r.problems for r in results),
            "no_tcgen05_on_sm100_16bit": sum("no tcgen05 on sm_100" in r.problems for r in results),
            "c7515_warnings": sum(r.c7515 or 0 for r in results),
            "max_sass_one_cut_over_full": max((sass_ratios(r)[0] for r in results if sass_ratios(r)[0]),
                                              default=None),
            "max_sass_any_kind_over_full": max((sass_ratios(r)[1] for r in results if sass_ratios(r)[1]),
                                               default=None),
            "tritons": sorted({r.triton for r in results if r.triton}),
            "failed": len(failed)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="every mask-flag combination too (default: the CI subset, "
                                                       "default flags)")
    p.add_argument("--targets", type=int, nargs="+", choices=sorted(SMEM_LIMIT), default=None)
    p.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float16", "float32", "float64"),
                   default=None)
    p.add_argument("--head-dims", "--head_dims", type=int, nargs="+", default=None)
    p.add_argument("--kernels", nargs="+", default=None, help="only these kernel functions (e.g. _fwd_kernel)")
    p.add_argument("--config", type=parse_config, action="append", default=[],
                   help="what-if: launch a kernel with this config instead of the shipped one, e.g. "
                        "dkdv=64x64/w8/s2 (BLOCK_M rows x BLOCK_N keys, warps, stages); repeatable")
    p.add_argument("--maxnreg", type=int, default=None,
                   help="what-if: cap registers per thread in every launch (ptxas then spills what does not fit)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--json", type=Path, default=None, help="write the rows and the summary here")
    p.add_argument("--also-triton", "--also_triton", type=Path, nargs="+", default=[],
                   help="folders holding another Triton (pip install --no-deps triton==3.6.0 --target DIR): the same "
                        "launches compiled again with each, in a process with DIR first on PYTHONPATH")
    return p.parse_args(argv)


def other_triton(folder: Path, argv: list) -> list[Result]:
    """The same check run with the Triton installed in ``folder``; its rows (each naming its version)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
        env.pop("TRITON_INTERPRET", None)
        subprocess.run([sys.executable, __file__, *argv, "--json", str(out)], env=env)
        if not out.exists():
            return [Result("(all)", 0, "-", 0, "-", f"triton in {folder}", error="the run wrote no rows",
                           problems=["compile error"])]
        rows = json.loads(out.read_text())["rows"]
    return [Result(**row) for row in rows]


def main(argv=None) -> dict:
    args = parse_args(argv)
    targets = args.targets or [90, 80]
    dtypes = args.dtypes or list(SHIPPED_DTYPES)
    head_dims = args.head_dims or [64, 128]
    flag_sets = list(itertools.product((False, True), (True, False))) if args.full else [(False, True)]
    for d in head_dims:
        if not 1 <= d <= 256:
            raise SystemExit(f"compile_check: head dim {d} is outside 1..256 (the kernels' limit)")
    paired = [name for name, config in args.config if len(config) > 7 and config[7]]
    wide = [d for d in dtypes if d not in ("bfloat16", "float16")]
    if paired and wide:
        raise SystemExit(f"compile_check: /pairs ({', '.join(paired)}) masks 16-bit tiles; drop {', '.join(wide)} from "
                         "--dtypes (e.g. --dtypes bfloat16)")
    start = time.perf_counter()
    jobs = capture(targets, dtypes, head_dims, flag_sets, replaced=dict(args.config))
    if args.kernels:
        unknown = set(args.kernels) - {j.kernel for j in jobs}
        if unknown:
            raise SystemExit(f"compile_check: no launch of {sorted(unknown)}; launched: "
                             f"{sorted({j.kernel for j in jobs})}")
        jobs = [j for j in jobs if j.kernel in args.kernels]
    if args.maxnreg:
        for job in jobs:
            job.options["maxnreg"] = args.maxnreg
            job.config += f" r{args.maxnreg}"
    print(f"compile_check: {len(jobs)} launches captured ({', '.join(sorted({j.kernel for j in jobs}))}); "
          f"compiling with {args.workers} worker(s)", file=sys.stderr)
    results = []
    import multiprocessing
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(compile_job, job): job for job in jobs}
        for n, future in enumerate(as_completed(futures), 1):
            job = futures[future]
            try:
                results.append(future.result())
            except Exception as exc:  # the worker died (e.g. an LLVM abort)
                r = Result(job.kernel, job.target, job.dtype, job.head_dim, job.flags, job.config)
                r.error, r.problems = f"worker died: {type(exc).__name__}", ["compile error"]
                results.append(r)
            if n % 10 == 0 or n == len(jobs):
                print(f"  {n}/{len(jobs)} compiled ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    for folder in args.also_triton:
        argv_again = [a for a in (sys.argv[1:] if argv is None else argv)]
        cut = [i for i, a in enumerate(argv_again) if a in ("--json", "--also-triton", "--also_triton")]
        if cut:  # drop --json/--also-triton and their values
            keep, skip = [], False
            for a in argv_again:
                if a in ("--json", "--also-triton", "--also_triton"):
                    skip = True
                    continue
                if skip and not a.startswith("--"):
                    continue
                skip = False
                keep.append(a)
            argv_again = keep
        results += other_triton(folder, argv_again)
    print_table(results)
    stats = summary(results)
    stats["seconds"] = round(time.perf_counter() - start, 1)
    print("\n" + ", ".join(f"{k} {v}" for k, v in stats.items()))
    if args.json:
        from benchmarks._common import git_commit, versions
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": {"commit": git_commit(), "versions": versions(), "targets": targets, "dtypes": dtypes,
                            "head_dims": head_dims, "full": args.full},
                   "summary": stats, "rows": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return {"summary": stats, "results": results}


if __name__ == "__main__":
    out = main()
    sys.exit(1 if out["summary"]["failed"] else 0)
