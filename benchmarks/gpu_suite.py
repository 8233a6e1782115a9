"""Every GPU check and benchmark in one command, results in one folder (DESIGN.md §9, §11).

    python benchmarks/gpu_suite.py                      # on a GPU: about 20-25 minutes on one H100
    python benchmarks/gpu_suite.py --out benchmarks/results/h100-2026-12-01/
    python benchmarks/gpu_suite.py --dry-run            # any machine: every part starts and finishes, tiny sizes
    python benchmarks/gpu_suite.py --parts kernel attention
    # --quick: headline sizes (limits 630 s in all) in two calls into one folder (a call keeps the parts an
    # earlier call put there); on a device loan, where only $OUT comes back, use benchmarks/gpu_loan.sh instead
    python benchmarks/gpu_suite.py --quick --out R --parts kernel attention
    python benchmarks/gpu_suite.py --quick --out R --parts cot_loss latency train
    python benchmarks/gpu_suite.py --quick --dry-run   # the quick plan's parts at tiny sizes
    # the full suite (estimated 20-25 minutes) over calls the same way
    python benchmarks/gpu_suite.py --out R --parts compile kernel attention cot_loss
    python benchmarks/gpu_suite.py --out R --parts latency train train_liger

Parts, in order (each in its own process with a time limit, its log in ``<out>/<part>.log``):

* ``compile``   - ``compile_check.py``: every kernel launch compiled for sm_90/sm_80 (registers, spills, smem);
* ``kernel``    - ``kernel_check.py``: bf16/fp16 kernel vs float64 on random packings at the model's shapes,
                  forward and grads, every flag; **a failed case stops the suite** (wrong results); a check that
                  crashes before any verdict (an ImportError, say) is reported as crashed and the suite goes on;
* ``attention`` - ``attention.py``: the kernel vs SDPA dense-mask, FlexAttention and FA2 varlen (if installed),
                  train and inference layouts, 4k-16k tokens;
* ``cot_loss``  - ``cot_loss_memory.py``: peak memory of the COT loss at 151,936 tokens of vocabulary;
* ``latency``   - ``latency.py``: Qwen2-VL-2B K 0/4/16/32 vs explicit CoT N 64/128/256 at batch 1/8/64;
* ``train``     - ``train_step.py``: the 2B recipe step (LoRA, grad cache, K=16 + COT) at batch 128;
* ``train_liger`` - the same with Liger-Kernel's RMSNorm/SwiGLU/M-RoPE (only where liger-kernel is installed):
                  its first loss must equal the plain step's (same seed and inputs) within 1%.

Writes ``<out>/summary.json`` and ``<out>/SUMMARY.md`` (device, versions, commit, each part's status and
headline numbers against the targets) beside each part's own JSON/plots. Exit status 1 when a part fails or
crashes, 0 otherwise. Default ``<out>``: ``benchmarks/results/<device>-<date>/`` (``dry-run-<device>-<date>``
with ``--dry-run``). Commit the folder: ``git add benchmarks/results/<folder>``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._common import device_slug, git_commit, versions  # noqa: E402

PARTS = ("compile", "kernel", "attention", "cot_loss", "latency", "train", "train_liger")


@dataclass
class Part:
    name: str
    argv: list  # script and arguments, relative to benchmarks/
    limit_s: int  # killed after this many seconds
    gating: bool = False  # a failure means wrong results (the suite fails loudly), not just a missing number


def plan(out: Path, dry_run: bool, quick: bool = False) -> list[Part]:
    """The commands of each part: full sizes on a GPU (``quick``: the headline sizes only), the smallest that
    exercise every code path in a dry run."""
    o = str(out)
    if quick and dry_run:  # the quick plan's parts, at the dry run's sizes
        quick_parts = {part.name for part in plan(out, False, quick=True)}
        return [part for part in plan(out, True) if part.name in quick_parts]
    if quick:
        # headline sizes; limits add up to 630 s over the two calls of README.md (kernel + attention: 290 s;
        # cot_loss + latency + train: 340 s), first-use compiles included. No compile part: the compile gate runs
        # on a CPU before a GPU is lent (compile_check.py). On a loan, where only $OUT comes back, use
        # gpu_loan.sh, which runs the same scripts with the same sizes.
        return [
            Part("kernel", ["kernel_check.py", "--tokens", "4093", "--head-dims", "128", "64", "--dtypes", "bfloat16",
                            "--seeds", "1", "--out", o, "--jsonl", f"{o}/kernel_check.jsonl"], 120, gating=True),
            Part("attention", ["attention.py", "--layouts", "train", "--tokens", "16384", "4096", "--modes", "fwd+bwd",
                               "--warmup", "3", "--repeats", "10", "--output", f"{o}/attention.json",
                               "--jsonl", f"{o}/attention.jsonl"], 170),
            Part("cot_loss", ["cot_loss_memory.py", "--json", f"{o}/cot_loss_memory.json"], 60),
            Part("latency", ["latency.py", "--preset", "qwen2-vl-2b", "--think-tokens", "0", "16", "--cot-tokens",
                             "128", "--batch-sizes", "1", "8", "--max-seconds", "8", "--precision", "0.02",
                             "--json", f"{o}/latency.json", "--plot", f"{o}/latency.png"], 150),
            Part("train", ["train_step.py", "--preset", "qwen2-vl-2b", "--batch-size", "64", "--grad-cache-chunk",
                           "16", "--steps", "3", "--json", f"{o}/train_step.json"], 130),
        ]
    if dry_run:
        return [
            Part("compile", ["compile_check.py", "--kernels", "_fwd_kernel", "--targets", "90",
                             "--json", f"{o}/compile_check.json"], 300, gating=True),
            Part("kernel", ["kernel_check.py", "--tiny", "--dtypes", "bfloat16", "--out", o,
                            "--jsonl", f"{o}/kernel_check.jsonl"], 600, gating=True),
            Part("attention", ["attention.py", "--device", "cpu", "--tiny", "--layouts", "train",
                               "--modes", "fwd", "--warmup", "0", "--repeats", "1",
                               "--output", f"{o}/attention.json"], 600),
            Part("cot_loss", ["cot_loss_memory.py", "--tokens", "64", "--hidden", "64", "--vocab", "1000",
                              "--no-plain", "--json", f"{o}/cot_loss_memory.json"], 300),
            Part("latency", ["latency.py", "--preset", "tiny", "--think-tokens", "0", "16", "--cot-tokens", "8",
                             "--batch-sizes", "1", "--warmup", "0", "--repeats", "2", "--max-seconds", "1",
                             "--json", f"{o}/latency.json", "--plot", f"{o}/latency.png"], 600),
            Part("train", ["train_step.py", "--preset", "tiny", "--batch-size", "2", "--cot-tokens", "8",
                           "--steps", "1", "--json", f"{o}/train_step.json"], 300),
        ]
    return [
        Part("compile", ["compile_check.py", "--json", f"{o}/compile_check.json"], 300, gating=True),
        Part("kernel", ["kernel_check.py", "--out", o, "--jsonl", f"{o}/kernel_check.jsonl"], 540, gating=True),
        Part("attention", ["attention.py", "--output", f"{o}/attention.json"], 420),
        Part("cot_loss", ["cot_loss_memory.py", "--json", f"{o}/cot_loss_memory.json"], 120),
        Part("latency", ["latency.py", "--preset", "qwen2-vl-2b", "--think-tokens", "0", "4", "16", "32",
                         "--cot-tokens", "64", "128", "256", "--batch-sizes", "1", "8", "64", "--max-seconds", "8",
                         "--precision", "0.02",
                         "--json", f"{o}/latency.json", "--plot", f"{o}/latency.png"], 540),
        Part("train", ["train_step.py", "--preset", "qwen2-vl-2b", "--batch-size", "128", "--grad-cache-chunk",
                       "16", "--steps", "3", "--json", f"{o}/train_step.json"], 420),
    ] + ([  # the same steps with Liger-Kernel's RMSNorm/SwiGLU/M-RoPE: equal losses (headlines), tokens/s
        Part("train_liger", ["train_step.py", "--preset", "qwen2-vl-2b", "--batch-size", "128", "--grad-cache-chunk",
                             "16", "--steps", "3", "--liger-kernels", "--json", f"{o}/train_step_liger.json"], 420)
    ] if importlib.util.find_spec("liger_kernel") else [])


def part_outputs(part: Part) -> list[Path]:
    """The result files a part writes (after --json / --output / --plot; kernel_check.json in --out)."""
    argv, found = part.argv, []
    for i, arg in enumerate(argv[:-1]):
        if arg in ("--json", "--output", "--plot", "--jsonl"):
            found.append(Path(argv[i + 1]))
        elif arg == "--out":
            found.append(Path(argv[i + 1]) / "kernel_check.json")
    return found


def run_part(part: Part, out: Path, env: dict) -> dict:
    cmd = [sys.executable, str(BENCH / part.argv[0]), *part.argv[1:]]
    for stale in part_outputs(part):  # an earlier run's numbers must never stand for this run's
        stale.unlink(missing_ok=True)
    log = out / f"{part.name}.log"
    print(f"[{part.name}] {' '.join(cmd[1:])}  (limit {part.limit_s} s, log {log})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=part.limit_s).returncode
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timed out"
    seconds = round(time.perf_counter() - start, 1)
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    print(f"[{part.name}] {status} in {seconds} s" + ("" if status == "ok" else ":\n    " + "\n    ".join(tail)),
          file=sys.stderr, flush=True)
    return {"part": part.name, "status": status, "returncode": rc, "seconds": seconds, "gating": part.gating,
            "command": " ".join(["python", "benchmarks/" + part.argv[0], *part.argv[1:]]), "log_tail": tail}


# -------------------------------------------------------------------------------------------------------------
# Headline numbers from each part's JSON (missing or changed formats give "-" rather than a crash)
# -------------------------------------------------------------------------------------------------------------

def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_jsonl(path: Path) -> list:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            pass
    return rows


def headlines(out: Path) -> dict:
    found = {}
    data = _load(out / "compile_check.json")
    if data:
        found["compile"] = data.get("summary")
    data = _load(out / "kernel_check.json")
    if data:
        rows = data.get("rows", [])
        found["kernel"] = {"cases": len(rows), "failed": sum(not r.get("ok") for r in rows),
                           "worst_out_err": max((r.get("out_err", 0) for r in rows), default=None),
                           "worst_grad_err": max((max(r.get("dq_err", 0), r.get("dk_err", 0), r.get("dv_err", 0))
                                                  for r in rows), default=None)}
    data = _load(out / "attention.json")
    if isinstance(data, list):
        found["attention"] = _attention_ratios(data)
    data = _load(out / "cot_loss_memory.json")
    if data:
        found["cot_loss"] = [{k: r.get(k) for k in ("method", "head_trainable", "peak_added_bytes", "seconds")}
                             for r in data.get("rows", [])]
    data = _load(out / "latency.json")
    if data:
        found["latency"] = data.get("targets")
    data = _load(out / "train_step.json")
    if data:
        found["train"] = data.get("summary")
    liger = _load(out / "train_step_liger.json")
    if data and liger:
        plain_loss, liger_loss = data["steps"][0]["loss"], liger["steps"][0]["loss"]
        found["train_liger"] = {**liger.get("summary", {}), "step0_loss": liger_loss, "step0_loss_without": plain_loss,
                                "losses_agree": abs(liger_loss - plain_loss) <= 1e-2 * abs(plain_loss),
                                "speedup": round(data["summary"]["seconds_per_step"]
                                                 / liger["summary"]["seconds_per_step"], 3)}
    return found


def _attention_ratios(rows: list) -> list:
    """fwd+bwd useful TFLOP/s of tte-triton over each other provider, per layout and size."""
    def key(r):
        return r.get("layout"), r.get("tokens"), r.get("mode")
    ours = {key(r): r for r in rows if r.get("provider") == "tte-triton"}
    ratios = []
    for r in rows:
        mine = ours.get(key(r))
        if r.get("provider") == "tte-triton" or mine is None or not r.get("tflops") or not mine.get("tflops"):
            continue
        ratios.append({"layout": r.get("layout"), "tokens": r.get("tokens"), "mode": r.get("mode"),
                       "vs": r.get("provider"), "ratio": round(mine["tflops"] / r["tflops"], 3)})
    return ratios


def write_summary(out: Path, meta: dict, results: list, found: dict) -> None:
    order = {name: i for i, name in enumerate(PARTS)}
    results = sorted(results, key=lambda r: order.get(r["part"], len(PARTS)))
    summary = {"meta": meta, "parts": results, "headlines": found}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    lines = [f"# GPU suite: {meta['device']} ({meta['date']})", "",
             f"commit `{meta['commit']}`, torch {meta['versions'].get('torch')}, triton "
             f"{meta['versions'].get('triton')}, transformers {meta['versions'].get('transformers')}, "
             f"flash_attn {meta['versions'].get('flash_attn')}" + (" — **dry run** (tiny sizes)" if meta["dry_run"]
                                                                    else ""), "",
             "| part | status | seconds | command |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['part']} | {r['status']} | {r['seconds']} | `{r['command']}` |")
    if "compile" in found and found["compile"]:
        lines += ["", "## Compile gate", "", ", ".join(f"{k} {v}" for k, v in found["compile"].items())]
    if "kernel" in found:
        k = found["kernel"]
        lines += ["", "## Kernel correctness (vs float64)", "",
                  f"{k['cases'] - k['failed']}/{k['cases']} cases pass; worst relative error: output "
                  f"{k['worst_out_err']:.2e}, grads {k['worst_grad_err']:.2e}"]
    if found.get("attention"):
        lines += ["", "## Attention: TTE kernel useful TFLOP/s over each provider", "",
                  "| layout | tokens | mode | vs | ratio |", "|---|---|---|---|---|"]
        lines += [f"| {r['layout']} | {r['tokens']} | {r['mode']} | {r['vs']} | {r['ratio']} |"
                  for r in found["attention"]]
    if found.get("cot_loss"):
        lines += ["", "## COT loss peak memory", "", "| method | head | added GiB | s |", "|---|---|---|---|"]
        lines += [f"| {r['method']} | {'trainable' if r['head_trainable'] else 'frozen'} | "
                  f"{(r['peak_added_bytes'] or 0) / 2**30:.3f} | {r['seconds']} |" for r in found["cot_loss"]]
    if found.get("latency"):
        lines += ["", "## Latency targets (median ratio over interleaved rounds, 95% CI)", "",
                  "| target | batch | value | 95% CI | verdict | applies here |", "|---|---|---|---|---|---|"]
        lines += [f"| {t.get('target')} | {t.get('batch_size')} | {_fmt(t.get('value'))} | "
                  f"{'-' if not t.get('ci95') else '%.3g-%.3g' % tuple(t['ci95'])} | "
                  f"{t.get('verdict', 'met' if t.get('met') else 'not met')} | {t.get('applies')} |"
                  for t in found["latency"]]
    if found.get("train"):
        lines += ["", "## Training step", "", ", ".join(f"{k} {_fmt(v)}" for k, v in found["train"].items())]
    if found.get("train_liger"):
        lines += ["", "## Training step with Liger-Kernel (RMSNorm, SwiGLU, M-RoPE)", "",
                  ", ".join(f"{k} {_fmt(v)}" for k, v in found["train_liger"].items())]
    (out / "SUMMARY.md").write_text("\n".join(lines) + "\n")


def _fmt(value):
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def environment(dry_run: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
            "date": datetime.date.today().isoformat(), "commit": git_commit(), "versions": versions(),
            "python": platform.python_version(), "dry_run": dry_run}
    if device.type == "cuda":
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        meta["cuda"] = torch.version.cuda
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True)
        meta["nvidia_smi"] = smi.stdout.strip()
    return meta


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>-<date>)")
    p.add_argument("--dry-run", "--dry_run", action="store_true",
                   help="tiny sizes: check that every part starts and finishes (the default without a GPU)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="run only these; parts already in --out's summary.json from an earlier call are kept")
    p.add_argument("--quick", action="store_true",
                   help="headline sizes only (estimated 8-10 minutes on an H100; with a 10-minute limit a command, "
                        "run it as two --parts calls into one --out)")
    p.add_argument("--continue-on-failure", "--continue_on_failure", action="store_true",
                   help="run the benchmarks even when the kernel check fails (default: stop, results are wrong)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu_suite: no CUDA device here; running the dry run (tiny sizes) instead", file=sys.stderr)
        args.dry_run = True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    meta = environment(args.dry_run)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or REPO / "benchmarks" / "results" / (
        ("dry-run-" if args.dry_run else "") + f"{device_slug(device)}-{meta['date']}")
    if out.exists() and not out.is_dir():
        print(f"gpu_suite: --out {out} is a file; give a folder for the results", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # each script decides (the kernel/attention checks set it without CUDA)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # parts run earlier into the same folder (a GPU session may split the suite over several calls) are kept
    previous = (_load(out / "summary.json") or {}).get("parts", [])
    results, start = [r for r in previous if r["part"] not in args.parts], time.perf_counter()
    for part in plan(out, args.dry_run, args.quick):
        if part.name not in args.parts:
            continue
        results.append(run_part(part, out, env))
        if part.name == "kernel" and results[-1]["status"] != "ok":
            wrong = any(not row.get("ok") for row in _load_jsonl(out / "kernel_check.jsonl"))
            results[-1]["wrong_results"] = wrong  # failed cases; otherwise the check crashed before any verdict
            if not wrong:
                results[-1]["status"] = "crashed" if results[-1]["status"] == "failed" else results[-1]["status"]
        write_summary(out, meta, results, headlines(out))  # after every part: a crash later keeps what was done
        if results[-1].get("wrong_results") and not args.continue_on_failure:
            print("gpu_suite: the kernel check FAILED (wrong results); stopping. See "
                  f"{out / 'kernel.log'}; --continue-on-failure runs the benchmarks anyway", file=sys.stderr)
            break
    liger = headlines(out).get("train_liger")
    if liger and not liger["losses_agree"]:
        results.append({"part": "train_liger (loss check)", "status": "failed", "gating": True, "returncode": None,
                        "seconds": 0, "command": "-", "log_tail": [f"step-0 loss {liger['step0_loss']} with Liger vs "
                                                                  f"{liger['step0_loss_without']} without"]})
        write_summary(out, meta, results, headlines(out))
    bad = [r for r in results if r["status"] != "ok" and r["part"] in args.parts]
    print(f"\ngpu_suite: {len(results) - len(bad)}/{len(results)} parts ok in {time.perf_counter() - start:.0f} s; "
          f"results in {out} (SUMMARY.md)", file=sys.stderr)
    for r in bad:
        print(f"  {r['part']}: {r['status']}{' (WRONG RESULTS)' if r.get('wrong_results') else ''} -> "
              f"{out / (r['part'] + '.log')}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
