"""What the shipped kernels compile to for AMD GPUs (ROCm), on a CPU: why the package keeps them off ROCm.

On ROCm, PyTorch's GPUs are ``cuda`` devices and Triton's target arch is a string (``gfx942``), so without a check
the automatic backend took the Triton kernels there, with the Hopper tiles (``_gpu_family`` of a string). This
script captures every launch of the forward and backward launchers as such a GPU would make them (the tiles of the
"hopper" family, as :mod:`benchmarks.compile_check` captures them for sm_90) and compiles each with Triton's AMD
backend for MI250 (gfx90a), MI300X / MI325X (gfx942) and MI350 / MI355X (gfx950): a compile error, the LDS (shared
memory) each needs against the GPU's limit, VGPRs, VGPR spills and scratch bytes, and how many MFMA instructions
it has. It reports; it is not a gate (nothing here runs on ROCm: ``unsupported_gpu`` refuses it).

    python benchmarks/rocm_compile.py --json benchmarks/results/rocm-compile-<date>.json
    python benchmarks/rocm_compile.py --archs gfx942 --head-dims 128

Runs on any Linux machine with the triton wheel (its AMD backend links in process); ``TRITON_INTERPRET`` unset.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks import compile_check  # noqa: E402

# LDS a workgroup may use: 64 KiB on CDNA2 / CDNA3, 160 KiB on CDNA4
LDS_LIMIT = {"gfx90a": 65536, "gfx942": 65536, "gfx950": 163840}


def _metric(asm: str, name: str):
    found = re.search(rf"{name}\s*[:=]\s*(\d+)", asm)
    return int(found.group(1)) if found else None


def compile_for(job, arch: str) -> dict:
    """One captured launch compiled for ``arch``: its numbers, or the error that stopped it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(compile_check.KERNEL_MODULE), job.kernel)
    row = {"triton": triton.__version__, "arch": arch, "kernel": job.kernel, "dtype": job.dtype,
           "head_dim": job.head_dim, "config": job.config}
    options = {name: job.options[name] for name in ("num_warps", "num_stages", "enable_fp_fusion")}
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs),
                                  target=GPUTarget("hip", arch, 64), options=options)
    except Exception as exc:  # a compile error is a result
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        row["error"] = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
        return row
    asm = compiled.asm.get("amdgcn", "")
    row.update(seconds=round(time.perf_counter() - start, 1), lds=int(compiled.metadata.shared),
               lds_limit=LDS_LIMIT[arch], vgprs=_metric(asm, r"\.vgpr_count"),
               vgpr_spills=_metric(asm, r"\.vgpr_spill_count"), sgpr_spills=_metric(asm, r"\.sgpr_spill_count"),
               scratch_bytes=_metric(asm, r"ScratchSize"), mfma=asm.count("v_mfma"))
    problems = []
    if row["lds"] > row["lds_limit"]:
        problems.append(f"LDS {row['lds']} > {row['lds_limit']}")
    if row["vgpr_spills"]:
        problems.append(f"{row['vgpr_spills']} VGPRs spilled ({row['scratch_bytes']} B scratch)")
    row["problems"] = problems
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", choices=sorted(LDS_LIMIT), default=sorted(LDS_LIMIT))
    p.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float16"), default=["bfloat16"])
    p.add_argument("--head-dims", "--head_dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    jobs = compile_check.capture([90], args.dtypes, args.head_dims, [(False, True)])  # ROCm's tiles: "hopper"
    rows = []
    print(f"{'arch':<7} {'kernel':<17} {'dtype':<9} {'d':>4} {'config':<16} {'LDS KiB':>8} {'VGPR':>5} "
          f"{'spilled':>8} {'scratch':>8} {'MFMA':>5}  problem")
    for arch in args.archs:
        for job in jobs:
            row = compile_for(job, arch)
            rows.append(row)
            if "error" in row:
                print(f"{arch:<7} {job.kernel:<17} {job.dtype:<9} {job.head_dim:>4} {job.config:<16} {'-':>8} "
                      f"{'-':>5} {'-':>8} {'-':>8} {'-':>5}  compile error: {row['error']}", flush=True)
                continue
            print(f"{arch:<7} {job.kernel:<17} {job.dtype:<9} {job.head_dim:>4} {job.config:<16} "
                  f"{row['lds'] / 1024:>8.1f} {row['vgprs']:>5} {row['vgpr_spills']:>8} {row['scratch_bytes']:>8} "
                  f"{row['mfma']:>5}  {'; '.join(row['problems'])}", flush=True)
    summary = {arch: {"launches": sum(r["arch"] == arch for r in rows),
                      "compile_errors": sum(r["arch"] == arch and "error" in r for r in rows),
                      "over_lds": sum(r["arch"] == arch and any(x.startswith("LDS") for x in r.get("problems", []))
                                      for r in rows),
                      "spilling": sum(r["arch"] == arch and bool(r.get("vgpr_spills")) for r in rows)}
               for arch in args.archs}
    print("\n" + json.dumps(summary))
    if args.json:
        from benchmarks._common import git_commit, versions
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": {"commit": git_commit(), "versions": versions(),
                                                  "archs": args.archs, "dtypes": args.dtypes,
                                                  "head_dims": args.head_dims},
                                         "summary": summary, "rows": rows}, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return {"summary": summary, "rows": rows}


if __name__ == "__main__":
    main()
