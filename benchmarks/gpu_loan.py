"""The device loan: two calls that bring back every headline number (DESIGN.md §11, issue 16).

A loan is one bare H100 or H200 machine (torch 2.11, Triton 3.6, transformers 5.17, no network, no package of ours
installed) for 15 minutes of device time, the machine's start included; one command runs for at most 10 minutes and
only what it leaves in ``$OUT`` comes back (at most 8 files, 2 folders deep). ``benchmarks/gpu_loan.sh PART`` is that
command:
it puts this tree on ``PYTHONPATH`` (no pip, no network) and runs this runner, which

* runs the part's jobs in the order of the headline numbers, each in its own process (own process group) with a
  time limit from the budget table below: a job may use its own budget plus what earlier jobs left unused, never
  time a later job was promised, and never past the part's deadline;
* appends every result row to ``$OUT/<part>-rows.jsonl`` as it is measured (the scripts' ``--jsonl``), and one
  line per job start and end to ``$OUT/<part>-jobs.jsonl``, so a job killed at its limit, or the whole call
  killed, keeps what ran;
* rewrites ``$OUT/<part>-SUMMARY.md`` (headline numbers against the targets) and ``$OUT/<part>-files.tar.gz``
  (every job's log and full JSON/plot) after each job;
* reports a kernel check with failed cases as WRONG RESULTS, and a job that crashes (an ImportError, say) as
  crashed, not as wrong results; neither stops the later jobs.

Files in ``$OUT`` per part (6 <= 8): ``<part>-console.log`` (the shell's tee), ``<part>-env.json`` (device,
versions, how the tree was installed, which FA2 implementation runs, a hash of the tree), ``<part>-rows.jsonl``,
``<part>-jobs.jsonl``, ``<part>-SUMMARY.md``, ``<part>-files.tar.gz``.

Parts (compiling for sm_90/sm_80 is done on a CPU before the loan: ``compile_check.py``, never here):

* ``a`` - the attention kernel: fwd+bwd against FlexAttention and FA2 varlen (flash-attn where installed, else
  PyTorch's own FA2 kernels, named in every row) on packed training layouts of 16k then 4k tokens; the
  kernel's correctness in bf16 at the shipped tiles (kernel_check: random packings x every flag, T % 16 == 0,
  one long sample, no GQA, head dims 128 and 64); inference layouts and forward-only last;
* ``b`` - end-to-end: latency of K=0 / K=16 / explicit CoT N=128 on the full-size architecture (batch 1, 8),
  then the training step's tokens/s, MFU and peak memory (batch 64, gradient-cache chunk 16, K=16 + COT).

The budget table (``JOBS``) holds each job's seconds on an H200 including first-use compiles (estimates: Triton
compiles a launch in ~4 s on a loaded 2-core CPU here, three kernels per dtype x head dim x alignment; a
FlexAttention fwd+bwd compile takes tens of seconds per shape). It is checked (``--rehearse`` and the tests):
each part's deadline is at most 540 s (9 minutes a call), and both parts plus a machine's start fit the
15-minute lease.

    bash benchmarks/gpu_loan.sh a          # on the device ($OUT set by the run tool); then, at once, part b
    bash benchmarks/gpu_loan.sh b
    bash benchmarks/gpu_loan.sh --rehearse # CPU: both parts in dry-run mode against a bare copy of the tree
    python benchmarks/gpu_loan.py --plan   # the budget table and the two run calls
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

CALL_LIMIT_S = 540  # one call's deadline at most (the run tool stops a command at 600 s)
LEASE_S = 900  # device time of a loan, the machine's start and both calls included
START_S = 120  # a machine's start ("a minute or more")
CALL_OVERHEAD_S = 20  # per call: the tree's transfer, $OUT's return, the gap before the next call
INSTALL_S = 10  # gpu_loan.sh: PYTHONPATH and the tte_flash.kernels link, python's start
FINISH_S = 10  # the last summary and tar
TIMEOUT_MARGIN_S = 40  # the run call's timeout_s over the part's deadline (a backstop; the runner stops itself)
MAX_FILES, MAX_DEPTH, MAX_FILE_BYTES, MAX_TOTAL_BYTES = 8, 2, 16 * 2**20, 64 * 2**20
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class Job:
    part: str
    name: str
    argv: list  # script (relative to benchmarks/) and arguments on the GPU; {rows} and {work} are filled in
    budget_s: int  # seconds on an H200, first-use compiles included
    dry_argv: list  # the same script at tiny sizes on the CPU (the rehearsal)
    what: str = ""
    outputs: list = field(default_factory=list)  # files the job writes under {work}


def _attention(layouts, tokens, modes, providers, name):
    return ["attention.py", "--layouts", *layouts, "--tokens", *tokens, "--modes", *modes, "--providers", *providers,
            "--warmup", "3", "--repeats", "10", "--output", "{work}/%s.json" % name, "--jsonl", "{rows}"]


def _attention_dry(layouts, modes, providers, name):
    return ["attention.py", "--device", "cpu", "--tiny", "--layouts", *layouts, "--modes", *modes, "--providers",
            *providers, "--output", "{work}/%s.json" % name, "--jsonl", "{rows}"]


ENV = ["gpu_loan.py", "--environment", "{env}"]
JOBS = [
    Job("a", "env", ENV, 10, ENV, "device, versions, install, FA2 implementation"),
    Job("a", "attention-headline",
        _attention(["train"], ["16384", "4096"], ["fwd+bwd"], ["tte-triton", "fa2-varlen", "flex",
                                                               "tte-triton-block-order"], "attention-headline"), 170,
        _attention_dry(["train"], ["fwd+bwd"], ["tte-triton", "fa2-varlen", "flex", "tte-triton-block-order"],
                       "attention-headline"),
        "TTE vs FA2 varlen vs FlexAttention, fwd+bwd, training layouts 16k and 4k; the same kernel with its programs "
        "in block order (the A/B of longest-first; no new compile)"),
    Job("a", "kernel-check",
        ["kernel_check.py", "--tokens", "4093", "--head-dims", "128", "64", "--dtypes", "bfloat16", "--seeds", "1",
         "--variants", "packed", "t16", "long", "group1", "--out", "{work}", "--jsonl", "{rows}"], 120,
        ["kernel_check.py", "--tiny", "--tokens", "40", "--head-dims", "16", "--dtypes", "bfloat16", "--variants",
         "packed", "t16", "long", "group1", "--out", "{work}", "--jsonl", "{rows}"],
        "bf16 vs float64 at the shipped tiles: 4 flag sets, T%16==0, one long sample, GROUP=1; d128 and d64"),
    Job("a", "attention-more",
        _attention(["infer"], ["16384", "4096"], ["fwd+bwd", "fwd"], ["tte-triton", "fa2-varlen", "flex", "tte-triton-tma",
                                                                       "tte-triton-pairs"], "attention-more"), 100,
        _attention_dry(["infer"], ["fwd+bwd", "fwd"], ["tte-triton", "fa2-varlen", "flex", "tte-triton-tma",
                                                       "tte-triton-pairs"], "attention-more"),
        "inference layouts, fwd+bwd and forward only; TMA loads in every kernel, and the backward's 16-bit pair masks "
        "(each checked, then timed)"),
    Job("b", "env", ENV, 10, ENV, "device, versions, install"),
    Job("b", "latency",
        ["latency.py", "--preset", "qwen2-vl-2b", "--device", "cuda", "--dtype", "bfloat16", "--attn", "triton",
         "--think-tokens", "0", "16", "--cot-tokens", "128", "--batch-sizes", "1", "8", "--max-seconds", "8",
         "--precision", "0.02", "--json", "{work}/latency.json", "--plot", "{work}/latency.png", "--jsonl", "{rows}"],
        150,
        ["latency.py", "--preset", "tiny", "--think-tokens", "0", "16", "--cot-tokens", "8", "--batch-sizes", "1",
         "--warmup", "0", "--repeats", "2", "--max-seconds", "1", "--json", "{work}/latency.json",
         "--plot", "{work}/latency.png", "--jsonl", "{rows}"],
        "Qwen2-VL-2B architecture: K=0 vs K=16 vs explicit CoT N=128, batch 1 and 8"),
    Job("b", "train-step",
        ["train_step.py", "--preset", "qwen2-vl-2b", "--batch-size", "64", "--grad-cache-chunk", "16", "--steps", "3",
         "--json", "{work}/train_step.json", "--jsonl", "{rows}"], 130,
        ["train_step.py", "--preset", "tiny", "--batch-size", "2", "--cot-tokens", "8", "--steps", "2",
         "--json", "{work}/train_step.json", "--jsonl", "{rows}"],
        "the 2B recipe step (LoRA, grad cache, K=16 + COT): tokens/s, MFU, peak memory"),
]
PARTS = ("a", "b")


def jobs_of(part: str) -> list[Job]:
    return [job for job in JOBS if job.part == part]


def deadline_s(part: str) -> int:
    """A part's seconds from the shell's start: install, every job's budget, the last summary and tar."""
    return INSTALL_S + sum(job.budget_s for job in jobs_of(part)) + FINISH_S


def run_call(part: str) -> dict:
    """The run tool's arguments for a part (README.md quotes them)."""
    return {"command": f"bash benchmarks/gpu_loan.sh {part}", "timeout_s": deadline_s(part) + TIMEOUT_MARGIN_S}


def budget_problems() -> list[str]:
    """What breaks the loan's limits in the budget table (empty when it fits)."""
    problems = []
    for part in PARTS:
        if deadline_s(part) > CALL_LIMIT_S:
            problems.append(f"part {part}: deadline {deadline_s(part)} s > {CALL_LIMIT_S} s a call")
        if run_call(part)["timeout_s"] > 600:
            problems.append(f"part {part}: timeout_s {run_call(part)['timeout_s']} > 600")
    lease = START_S + sum(deadline_s(p) + CALL_OVERHEAD_S for p in PARTS)
    if lease > LEASE_S:
        problems.append(f"both parts + a start: {lease} s > the lease's {LEASE_S} s")
    return problems


def print_plan() -> None:
    for part in PARTS:
        print(f"part {part}: deadline {deadline_s(part)} s; run(command={run_call(part)['command']!r}, "
              f"timeout_s={run_call(part)['timeout_s']})")
        for job in jobs_of(part):
            print(f"  {job.name:20} {job.budget_s:4d} s  {job.what}")
    lease = START_S + sum(deadline_s(p) + CALL_OVERHEAD_S for p in PARTS)
    print(f"lease: start {START_S} s + parts {' + '.join(str(deadline_s(p)) for p in PARTS)} s + "
          f"{len(PARTS)} x {CALL_OVERHEAD_S} s transfers = {lease} s of {LEASE_S} s")
    for problem in budget_problems():
        print(f"OVER BUDGET: {problem}")


# ---------------------------------------------------------------------------------------------------------------
# The environment job (a process of its own, so the runner never touches CUDA)
# ---------------------------------------------------------------------------------------------------------------

def tree_hash(root: Path = REPO) -> str:
    """sha256 over the package, kernels and benchmark sources (path and bytes): names the code that ran where the
    device's copy has no git history; ``python benchmarks/gpu_loan.py --tree-hash`` gives it for a checkout."""
    digest = hashlib.sha256()
    for folder in ("tte_flash", "kernels", "benchmarks", "training"):
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" in path.parts or path.is_symlink():
                continue
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def environment(path: Path) -> dict:
    import importlib
    import platform
    sys.path.insert(0, str(REPO))
    import torch
    from benchmarks._common import git_commit, versions
    env = {"python": sys.executable, "python_version": platform.python_version(), "versions": versions(),
           "commit": git_commit(), "tree_hash": tree_hash(), "install": os.environ.get("TTE_LOAN_INSTALL"),
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    kernels = importlib.import_module("tte_flash.kernels")
    env["tte_flash.kernels"] = os.path.realpath(kernels.__file__)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True)
        env["nvidia_smi"] = smi.stdout.strip()
    try:
        import inspect
        from torch.nn.attention.varlen import varlen_attn
        env["torch_varlen_attn"] = str(inspect.signature(varlen_attn))
    except Exception as error:  # torch < 2.9
        env["torch_varlen_attn"] = f"absent ({type(error).__name__})"
    env["flash_attn"] = env["versions"].get("flash_attn")
    path.write_text(json.dumps(env, indent=1))
    print(json.dumps(env, indent=1))
    if not env["tte_flash.kernels"].startswith(str(REPO.resolve()) + os.sep):
        raise SystemExit(f"tte_flash.kernels came from {env['tte_flash.kernels']}, not this tree ({REPO})")
    return env


# ---------------------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------------------

def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a kill
                pass
    return rows


def _fill(argv: list, files: dict) -> list:
    return [arg.format(**files) if "{" in arg else arg for arg in argv]


def run_job(job: Job, argv: list, limit_s: float, log: Path, env: dict) -> tuple[str, int | None, float]:
    """Run one job in its own process group, killed (with its children: compile workers) at ``limit_s``."""
    cmd = [sys.executable, str(BENCH / argv[0]), *argv[1:]]
    start = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + f"\n# limit {limit_s:.0f} s\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(limit_s, 1))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timed out"
    return status, rc, time.monotonic() - start


def classify(job: Job, status: str, rows: list[dict]) -> str:
    """A kernel check that wrote a failed case is WRONG RESULTS; one that ended without any is a crash."""
    if job.name != "kernel-check" or status == "ok":
        return status
    if any(r.get("source") == "kernel_check" and r.get("ok") is False for r in rows):
        return "WRONG RESULTS"
    return "crashed" if status == "failed" else status


def log_tail(log: Path, lines: int = 12) -> list[str]:
    return log.read_text(errors="replace").strip().splitlines()[-lines:] if log.exists() else []


def tar_work(work: Path, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(work, arcname=target.name.replace(".tar.gz", ""))
    tmp.replace(target)


def run_part(part: str, out: Path, dry_run: bool, t0: float, deadline: float | None = None,
             dry_limit_s: int = 600) -> int:
    """Run ``part``'s jobs into ``out``; 0 when every job is ok, 1 otherwise."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"tte-loan-{part}-"))
    files = {"rows": str(out / f"{part}-rows.jsonl"), "env": str(out / f"{part}-env.json"), "work": str(work)}
    jobs_log, summary, tar = out / f"{part}-jobs.jsonl", out / f"{part}-SUMMARY.md", out / f"{part}-files.tar.gz"
    deadline = deadline_s(part) if deadline is None else deadline
    env = dict(os.environ)
    if not dry_run:
        env.pop("TRITON_INTERPRET", None)  # the real kernels on the GPU
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONUNBUFFERED"] = "1"
    schedule = INSTALL_S  # the time by which each job must end: its budget plus what earlier jobs left over
    results = []
    for job in jobs_of(part):
        schedule += job.budget_s
        now = time.time() - t0
        limit = dry_limit_s if dry_run else min(schedule, deadline - FINISH_S) - now
        if limit < 5:
            results.append({"job": job.name, "status": "skipped (no time left)", "budget_s": job.budget_s})
            _append(jobs_log, {**results[-1], "at_s": round(now, 1)})
            continue
        argv = _fill(job.dry_argv if dry_run else job.argv, files)
        log = work / f"{job.name}.log"
        _append(jobs_log, {"job": job.name, "event": "start", "at_s": round(now, 1), "limit_s": round(limit),
                           "budget_s": job.budget_s, "command": " ".join(argv)})
        print(f"[{part}/{job.name}] start at {now:.0f} s, limit {limit:.0f} s (budget {job.budget_s} s): "
              f"{' '.join(argv)}", flush=True)
        status, rc, seconds = run_job(job, argv, limit, log, env)
        status = classify(job, status, _read_jsonl(Path(files["rows"])))
        result = {"job": job.name, "event": "end", "status": status, "returncode": rc, "seconds": round(seconds, 1),
                  "budget_s": job.budget_s, "limit_s": round(limit), "at_s": round(time.time() - t0, 1),
                  "log_tail": [] if status == "ok" else log_tail(log)}
        results.append(result)
        _append(jobs_log, result)
        print(f"[{part}/{job.name}] {status} in {seconds:.0f} s" +
              ("" if status == "ok" else ":\n    " + "\n    ".join(result["log_tail"])), flush=True)
        write_summary(part, out, dry_run)
        tar_work(work, tar)
    text = write_summary(part, out, dry_run)
    tar_work(work, tar)
    print("\n" + text)
    bad = [r for r in results if r["status"] != "ok"]
    print(f"gpu_loan {part}: {len(results) - len(bad)}/{len(results)} jobs ok in {time.time() - t0:.0f} s "
          f"(deadline {deadline} s); results in {out}", flush=True)
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------------------------
# Headline numbers
# ---------------------------------------------------------------------------------------------------------------

def _f(value, spec=".3g"):
    return "-" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)


def headline_lines(rows: list[dict]) -> list[str]:
    lines = []
    attention = [r for r in rows if r.get("kernel") == "tte_attention" and r.get("provider")]
    if attention:
        lines += ["## Attention: useful TFLOP/s (targets: TTE >= 1.2x flex, >= 1.0x fa2-varlen, fwd+bwd)", "",
                  "| layout | tokens | mode | provider | status | ms p50 | TFLOP/s | TTE x | peak MB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        tte = {(r["layout"], r["tokens"], r["mode"]): r.get("tflops") for r in attention
               if r["provider"] == "tte-triton" and r.get("status") == "ok"}
        for r in attention:
            mine = tte.get((r["layout"], r["tokens"], r.get("mode")))
            ratio = mine / r["tflops"] if mine and r.get("tflops") else None
            lines.append(f"| {r['layout']} | {r['tokens']} | {r.get('mode') or '-'} | {r['provider']} | "
                         f"{r.get('status', 'ok')} | {_f(r.get('ms_p50'))} | {_f(r.get('tflops'))} | {_f(ratio)} | "
                         f"{_f(r.get('peak_mem_mb'), '.0f')} |")
        for impl in sorted({r["implementation"] for r in attention if r.get("implementation")}):
            lines.append(f"\nfa2-varlen ran as: {impl}")
        if any(r["provider"].startswith("tte-triton-") for r in attention):
            lines.append("\nA/Bs of the kernel (TTE x = shipped over the variant): tte-triton-block-order > 1 means "
                         "launching the longest programs first pays (modelled fwd+bwd gain on packed 16k layouts: "
                         "fwd/dQ ~1.06, dK/dV ~1.5; block_table_build.py --schedule); tte-triton-tma < 1 means TMA "
                         "loads would pay (fwd rows: the forward's K/V; fwd+bwd rows: all three kernels'); "
                         "tte-triton-pairs < 1 (fwd+bwd rows; its forward is the shipped one) means masking the "
                         "backward's 16-bit P / dS two elements an instruction would pay")
        for r in attention:
            if r.get("status") in ("unavailable", "failed"):
                lines.append(f"\n{r['provider']} {r.get('mode') or ''} ({r['layout']}, {r['tokens']}): "
                             f"{r['status']}: {str(r.get('reason'))[:300]}")
            if r.get("status") == "wrong-results":
                lines.append(f"\n**WRONG RESULTS** {r['provider']} ({r['layout']}, {r['tokens']}): {r.get('check')}")
        lines.append("")
    checks = [r for r in rows if r.get("source") == "kernel_check"]
    if checks:
        failed = [r for r in checks if not r.get("ok")]
        worst = max(max(r.get(f"{n}_err", 0) / max(r.get(f"{n}_baseline_err", 0), 1e-12) for n in ("out", "dq", "dk",
                                                                                                    "dv"))
                    for r in checks)
        lines += ["## Kernel check (bf16 vs float64)", "",
                  f"{len(checks) - len(failed)}/{len(checks)} cases pass; worst error over the plain bf16 "
                  f"attention's: {worst:.2f}x (allowed 3x + slack)" +
                  (f"; FAILED: {', '.join(r['variant'] + ' d' + str(r['head_dim']) for r in failed)}" if failed
                   else ""), ""]
    latency = [r for r in rows if r.get("source") == "latency"]
    if latency:
        lines += ["## Latency (ratio to K=0, median over interleaved rounds; targets: K=16 <= 1.10x K=0, explicit "
                  "CoT N=128 >= 20x K=16)", "", "| config | batch | ms | x K=0 | x K=16 |", "|---|---|---|---|---|"]
        lines += [f"| {r.get('label')} | {r.get('batch_size')} | {_f(r.get('median_ms'))} | {_f(r.get('vs_k0'))} | "
                  f"{_f(r.get('vs_tte'))} |" for r in latency]
        lines.append("")
    steps = [r for r in rows if r.get("source") == "train_step"]
    if steps:
        lines += ["## Training step (target: MFU >= 40%)", ""]
        for r in steps:
            if r.get("summary"):
                lines.append(f"summary: {_f(r.get('seconds_per_step'))} s/step, {_f(r.get('tokens_per_s'))} "
                             f"tokens/s, MFU {_f(r.get('mfu'))}, peak {_f(r.get('peak_memory_gb'))} GB")
            else:
                lines.append(f"step {r.get('step')}: {r.get('seconds')} s, {r.get('tokens_per_s')} tokens/s, peak "
                             f"{r.get('peak_memory_gb')} GB, loss {_f(r.get('loss'))}")
        lines.append("")
    return lines


def write_summary(part: str, out: Path, dry_run: bool) -> str:
    jobs = [r for r in _read_jsonl(out / f"{part}-jobs.jsonl") if r.get("event") != "start"]
    env = {}
    try:
        env = json.loads((out / f"{part}-env.json").read_text())
    except (OSError, ValueError):
        pass
    lines = [f"# Device loan, part {part}{' (DRY RUN: tiny sizes on the CPU, timings mean nothing)' if dry_run else ''}",
             "", f"device {env.get('device', env.get('nvidia_smi', '?'))}, torch {env.get('versions', {}).get('torch')}, "
             f"triton {env.get('versions', {}).get('triton')}, commit {env.get('commit')}, tree {env.get('tree_hash')}, "
             f"install {env.get('install')}", "", "| job | status | seconds | budget s | limit s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['job']} | {r['status']} | {r.get('seconds', '-')} | {r.get('budget_s')} | {r.get('limit_s', '-')} |"
              for r in jobs]
    lines += [""] + headline_lines(_read_jsonl(out / f"{part}-rows.jsonl"))
    text = "\n".join(lines) + "\n"
    (out / f"{part}-SUMMARY.md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------------------------------
# The rehearsal: the same shell script against a bare copy of the tree, on the CPU
# ---------------------------------------------------------------------------------------------------------------

def out_problems(out: Path) -> list[str]:
    """What the run tool would not bring back from ``out``: more than 8 files, deeper than 2 folders, odd names,
    files over 16 MiB or 64 MiB together, anything but plain files and folders."""
    problems, files, total = [], [], 0
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if not all(NAME.match(part) for part in rel.parts):
            problems.append(f"{rel}: a name with characters other than letters, digits, '.', '_', '-'")
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            problems.append(f"{rel}: not a plain file or folder")
        elif path.is_file():
            files.append(rel)
            total += path.stat().st_size
            if len(rel.parts) - 1 > MAX_DEPTH:
                problems.append(f"{rel}: more than {MAX_DEPTH} folders down")
            if path.stat().st_size > MAX_FILE_BYTES:
                problems.append(f"{rel}: over 16 MiB")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files (at most {MAX_FILES}): {', '.join(map(str, files))}")
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB together (at most 64)")
    return problems


def bare_copy(target: Path) -> int:
    """Copy what the run tool sends (tracked and untracked-not-ignored files, no .git) to ``target``; its bytes."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    size = 0
    for name in filter(None, listed):
        source = REPO / name
        if not source.exists() and not source.is_symlink():  # deleted in the working tree
            continue
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), dest)
        elif source.is_file():
            shutil.copy2(source, dest)
            size += source.stat().st_size
    return size


def rehearse(parts, keep: bool = False, dry_limit_s: int = 600) -> int:
    """Both parts in dry-run mode through ``gpu_loan.sh`` on a bare copy, each into a fresh ``$OUT``; checks the
    budget table, the files that would come back, that every job ran and wrote rows; 1 (loudly) when not."""
    problems = [f"budget: {p}" for p in budget_problems()]
    root = Path(tempfile.mkdtemp(prefix="tte-loan-rehearsal-"))
    for part in parts:
        tree = root / f"tree-{part}"  # a fresh machine each call: a fresh copy
        size = bare_copy(tree)
        print(f"rehearsal: bare copy of the tree in {tree} ({size / 2**20:.1f} MiB; the run tool sends at most 64)")
        if size > 64 * 2**20:
            problems.append(f"tree: {size / 2**20:.1f} MiB > 64 MiB")
        out = root / f"out-{part}"
        out.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("OUT", "LOAN_T0", "TRITON_INTERPRET", "PYTHONPATH")}
        env.update(OUT=str(out), PYTHON=sys.executable, TTE_LOAN_DRY_RUN="1", TTE_LOAN_DRY_LIMIT_S=str(dry_limit_s),
                   TMPDIR=str(root))  # the runner's work folder goes with the rest
        start = time.monotonic()
        done = subprocess.run(["bash", "benchmarks/gpu_loan.sh", part], cwd=tree, env=env, capture_output=True,
                              text=True)
        seconds = time.monotonic() - start
        print(f"\n--- part {part}: exit {done.returncode} in {seconds:.0f} s on the CPU (budgeted on the GPU: "
              f"{deadline_s(part)} s) ---\n" + "\n".join(done.stdout.strip().splitlines()[-40:]))
        if done.returncode != 0:
            problems.append(f"part {part}: gpu_loan.sh exited {done.returncode}: {done.stderr.strip()[-1500:]}")
        problems += [f"part {part}: $OUT: {p}" for p in out_problems(out)]
        problems += [f"part {part}: {p}" for p in _part_problems(part, out, tree)]
        listing = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        print(f"files back from part {part} ({len(listing)}): {', '.join(listing)}")
    print()
    print_plan()
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    if problems:
        print("\nREHEARSAL FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"\nrehearsal passed: parts {', '.join(parts)} ran in a bare copy, <= {MAX_FILES} files back each, "
          f"deadlines {', '.join(f'{p} {deadline_s(p)} s' for p in parts)} (<= {CALL_LIMIT_S} s a call)")
    return 0


def _part_problems(part: str, out: Path, tree: Path) -> list[str]:
    problems = []
    ends = {r["job"]: r for r in _read_jsonl(out / f"{part}-jobs.jsonl") if r.get("event") != "start"}
    for job in jobs_of(part):
        if job.name not in ends:
            problems.append(f"job {job.name}: no end recorded")
        elif ends[job.name]["status"] != "ok":
            problems.append(f"job {job.name}: {ends[job.name]['status']}: {' / '.join(ends[job.name]['log_tail'][-5:])}")
    rows = _read_jsonl(out / f"{part}-rows.jsonl")
    sources = {r.get("source") or ("attention" if r.get("kernel") == "tte_attention" else None) for r in rows}
    wanted = {"a": {"attention", "kernel_check"}, "b": {"latency", "train_step"}}[part]
    if not wanted <= sources:
        problems.append(f"rows from {sorted(wanted - sources)} missing in {part}-rows.jsonl")
    if part == "a" and not any(r.get("provider") == "fa2-varlen" for r in rows):
        problems.append("no fa2-varlen row (measured or unavailable with its reason)")
    # the shipped kernel and its block-order A/B run on the CPU too (the interpreter): each of their rows measured
    # (a provider that fails writes a row and the job still ends ok, so the job status alone would not show it)
    for r in rows:
        if r.get("provider") in ("tte-triton", "tte-triton-block-order") and r.get("status") != "ok":
            problems.append(f"{r['provider']} {r.get('mode')} ({r.get('layout')}): {r.get('status')}: "
                            f"{str(r.get('reason') or r.get('check'))[:300]}")
    try:
        env = json.loads((out / f"{part}-env.json").read_text())
        if not env["tte_flash.kernels"].startswith(str(tree.resolve()) + os.sep):
            problems.append(f"tte_flash.kernels came from {env['tte_flash.kernels']}, not the copy")
    except (OSError, ValueError, KeyError) as error:
        problems.append(f"{part}-env.json: {error!r}")
    try:
        with tarfile.open(out / f"{part}-files.tar.gz") as tar:
            logs = {Path(n).name for n in tar.getnames() if n.endswith(".log")}
        missing = {f"{job.name}.log" for job in jobs_of(part)} - logs
        if missing:
            problems.append(f"{part}-files.tar.gz lacks {sorted(missing)}")
    except (OSError, tarfile.TarError) as error:
        problems.append(f"{part}-files.tar.gz: {error!r}")
    return problems


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", nargs="*", help="a or b (--rehearse: both by default)")
    p.add_argument("--out", type=Path, default=None, help="the folder that comes back ($OUT)")
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("TTE_LOAN_DRY_RUN") == "1",
                   help="tiny sizes on the CPU (the rehearsal sets it through TTE_LOAN_DRY_RUN=1)")
    p.add_argument("--deadline", type=int, default=None,
                   help="seconds from the shell's start for this part (default: its budget; lower it when less of "
                        "the lease is left)")
    p.add_argument("--rehearse", action="store_true", help="CPU: run the parts in dry-run mode on a bare copy")
    p.add_argument("--keep", action="store_true", help="--rehearse: keep the temporary copy and outputs")
    p.add_argument("--plan", action="store_true", help="print the budget table and the run calls")
    p.add_argument("--environment", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tree-hash", action="store_true", help="print the tree hash that env.json records")
    args = p.parse_args(argv)
    if set(args.part) - set(PARTS):
        p.error(f"parts are {', '.join(PARTS)}, not {', '.join(sorted(set(args.part) - set(PARTS)))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.environment:
        environment(args.environment)
        return 0
    if args.tree_hash:
        print(tree_hash())
        return 0
    if args.plan:
        print_plan()
        return 1 if budget_problems() else 0
    if args.rehearse:
        return rehearse(args.part or list(PARTS), keep=args.keep,
                        dry_limit_s=int(os.environ.get("TTE_LOAN_DRY_LIMIT_S", 600)))
    if len(args.part) != 1 or args.out is None:
        print("usage: gpu_loan.py a|b --out DIR (or --rehearse, --plan)", file=sys.stderr)
        return 2
    if not args.dry_run and shutil.which("nvidia-smi") is None:
        print("gpu_loan: no nvidia-smi here; this is the device script (--rehearse on a CPU)", file=sys.stderr)
        return 2
    t0 = float(os.environ.get("LOAN_T0") or time.time())
    return run_part(args.part[0], args.out, args.dry_run, t0, args.deadline,
                    int(os.environ.get("TTE_LOAN_DRY_LIMIT_S", 600)))


if __name__ == "__main__":
    sys.exit(main())
