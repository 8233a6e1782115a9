"""Which Tritons compile the kernels: every shipped bf16 launch for sm_90 and sm_80, compiled on a CPU with the Triton
first on ``PYTHONPATH``, for the releases ``compile_check.py`` cannot capture (its capture needs Triton 3.5 or newer).

The launchers run as on a GPU of that target (a stand-in driver, as compile_check's), each launch is compiled for
real by ``triton.compiler.compile`` (ptxas included) and then dropped instead of launched. Per launch: compiled or
the error that stopped it, shared memory, registers and stack / local bytes (``cuobjdump -res-usage`` of the cubin),
and whether the TTGIR has wgmma. Why the kernels need Triton 3.4 (``MIN_TRITON``):

    pip install --no-deps triton==3.3.1 --target /tmp/triton33
    PYTHONPATH=/tmp/triton33 python benchmarks/old_triton_compile.py     # 3.2, 3.3: AttributeError, nothing compiles
    PYTHONPATH=/tmp/triton34 python benchmarks/old_triton_compile.py     # 3.4: every launch compiles
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.pop("TRITON_INTERPRET", None)


class _Dropped:
    """Stands in for a compiled kernel: its launch does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _resources(cubin: bytes) -> tuple:
    """(registers, stack bytes, local bytes) of a cubin, from the cuobjdump that ships with Triton."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    return tuple(int(x) for x in found.groups()) if found else (None, None, None)


def main() -> int:
    import torch
    import triton
    import triton.compiler
    from triton.runtime.driver import driver

    from benchmarks import compile_check

    kernels = importlib.import_module(compile_check.KERNEL_MODULE)
    real_compile = triton.compiler.compile
    rows = []

    class Driver(compile_check._TargetOnlyDriver):
        def __getattr__(self, name):  # whatever else an older JIT asks of its driver
            return lambda *args, **kwargs: _Dropped()

    def compile_and_drop(src, target=None, options=None):
        row = {"kernel": src.fn.__name__, "target": target.arch}
        try:
            compiled = real_compile(src, target=target, options=options)
            registers, stack, local = _resources(compiled.asm["cubin"])
            row.update(shared=int(compiled.metadata.shared), registers=registers, stack=stack, local=local,
                       wgmma="warp_group_dot" in compiled.asm.get("ttgir", ""))
        except Exception as exc:  # the first error of an older Triton is the finding
            while exc.__cause__ is not None:
                exc = exc.__cause__
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        rows.append(row)
        return _Dropped()

    for target in (90, 80):
        driver.set_active(Driver(target))
        triton.compiler.compile = compile_and_drop  # what the JIT imports when it first binds a target
        for head_dim in (64, 128, 256):
            compile_check.run_launchers(kernels, torch.bfloat16, head_dim)
    triton.compiler.compile = real_compile
    print(f"triton {triton.__version__}")
    for row in rows:
        print("  " + ", ".join(f"{key} {value}" for key, value in row.items()))
    failed = sum("error" in row for row in rows)
    print(f"{len(rows) - failed} of {len(rows)} launches compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
