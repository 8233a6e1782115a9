"""The GPU path proven on a CPU (DESIGN.md §11): the compile gate, the kernel check, the COT-loss memory and
training-step benchmarks, and the one-command GPU suite in its dry run."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _script_env():
    """The environment a benchmark script runs in here: compiled, not interpreted; one thread."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _script(name, *args, timeout=900):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], cwd=REPO, env=_script_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(sys.platform != "linux", reason="triton (and its ptxas) is Linux-only")
def test_compile_gate_every_shipped_config_compiles_for_sm90_and_sm80_without_spills(tmp_path):
    """CI subset of the gate (bf16/fp16 x head dim 64/128, default flags, every kernel's shipped config, sm_90
    and sm_80): compiles with Triton's own compiler, no spill on either target, shared memory within each target's
    limit."""
    done = _script("compile_check.py", "--json", str(tmp_path / "gate.json"))
    report = json.loads((tmp_path / "gate.json").read_text())
    rows, summary = report["rows"], report["summary"]
    assert {r["kernel"] for r in rows} >= {"_fwd_kernel", "_bwd_dq_kernel"}, rows
    assert {r["target"] for r in rows} == {90, 80}
    assert all(r["ok"] and r["registers"] and r["shared"] for r in rows), [r for r in rows if not r["ok"]]
    # Hopper tensor cores: every 16-bit sm_90 kernel is lowered to wgmma, none on sm_80
    assert all(r["wgmma"] == (r["target"] == 90) for r in rows)
    assert all(r["spill_stores"] == 0 for r in rows), [(r["kernel"], r["target"], r["config"]) for r in rows]
    failures = [f"{r['kernel']} sm_{r['target']} {r['config']}: {r['problems']}" for r in rows if r["problems"]]
    assert summary["failed"] == 0 and done.returncode == 0, "\n".join(failures) + done.stdout[-3000:]


@pytest.mark.skipif(sys.platform != "linux", reason="triton (and its ptxas) is Linux-only")
def test_compile_gate_catches_a_spilling_config(tmp_path):
    """A register cap below what the forward needs (128 a thread) makes ptxas spill: the gate must say so and
    exit non-zero (the gate is not vacuous)."""
    done = _script("compile_check.py", "--kernels", "_fwd_kernel", "--targets", "90", "--dtypes", "bfloat16",
                   "--head-dims", "128", "--maxnreg", "128",
                   "--workers", "1", "--json", str(tmp_path / "gate.json"))
    rows = json.loads((tmp_path / "gate.json").read_text())["rows"]
    assert done.returncode == 1
    assert rows and all(r["spill_stores"] > 0 and "spills on sm_90" in r["problems"] for r in rows)


@pytest.mark.skipif(sys.platform != "linux", reason="triton (and its ptxas) is Linux-only")
def test_each_gpu_family_gets_tiles_that_compile_for_it_without_spills(tmp_path):
    """The launchers pick tiles by GPU family (``_gpu_family``): on sm_120 (RTX 50xx, RTX PRO Blackwell: no wgmma,
    99 KiB of shared memory) the Hopper tiles spilled 32-212 B a launch at head dim 128; on sm_100 (B200) the dK/dV
    kernel's one launch at d128 spilled 572 B. Compiled for those targets as a launch there would be, every head-dim-128
    launch now fits: no spill, shared memory within the target's limit, no wgmma on sm_120, dK/dV as two launches on
    sm_100 (dV, then dK) on its tensor cores (tcgen05)."""
    runs = {}
    for target, kernels in (("120", []), ("100", ["--kernels", "_bwd_dkdv_kernel"])):  # both at once
        argv = [sys.executable, str(REPO / "benchmarks" / "compile_check.py"), "--targets", target, "--dtypes",
                "bfloat16", "--head-dims", "128", "--workers", "1", "--json", str(tmp_path / f"{target}.json"),
                *kernels]
        runs[target] = subprocess.Popen(argv, cwd=REPO, env=_script_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
    rows = {}
    for target, run in runs.items():
        output = run.communicate(timeout=900)[0]
        rows[target] = json.loads((tmp_path / f"{target}.json").read_text())["rows"]
        assert run.returncode == 0, output[-3000:]
        assert all(r["ok"] and not r["problems"] and r["spill_stores"] == 0 for r in rows[target]), rows[target]
    assert sorted(r["kernel"] for r in rows["120"]) == ["_bwd_dkdv_kernel", "_bwd_dq_kernel", "_fwd_kernel"]
    assert not any(r["wgmma"] for r in rows["120"])
    assert sorted(r["config"] for r in rows["100"]) == ["32x128 w8 s2 dK", "32x128 w8 s2 dV"]
    assert all(r["tcgen05"] for r in rows["100"])  # Blackwell's tensor cores, not the mma.sync fallback


@pytest.mark.skipif(sys.platform != "linux", reason="triton (and its ptxas) is Linux-only")
def test_every_launch_asks_for_fused_multiply_adds():
    """The kernels compile with FP fusion whatever Triton's default (Triton 3.10 turns it off by default, 3.9 warns
    that it will): the forward's exp argument ``qk * scale - m`` is one FFMA an element, as compile_check counted."""
    code = ("import benchmarks.compile_check as cc; "
            "print(sorted({(j.kernel, j.options['enable_fp_fusion']) for j in cc.capture([90, 80], ['bfloat16'], [64],"
            " [(False, True)])}))")
    env = dict(_script_env(), TRITON_DEFAULT_FP_FUSION="0")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == str([("_bwd_dkdv_kernel", True), ("_bwd_dq_kernel", True), ("_fwd_kernel", True)])


@pytest.mark.skipif(sys.platform != "linux", reason="triton (and its AMD backend) is Linux-only")
def test_rocm_report_shows_why_the_kernels_are_kept_off_rocm(tmp_path):
    """benchmarks/rocm_compile.py compiles the launches a ROCm GPU would make: for MI250 (gfx90a) they do not compile
    (tf32 dot precision), for MI300X (gfx942) the d128 forward needs more than its 64 KiB of LDS (what
    ``unsupported_gpu`` says on ROCm)."""
    out = tmp_path / "rocm.json"
    run = _script("rocm_compile.py", "--archs", "gfx90a", "gfx942", "--head-dims", "128", "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and {r["kernel"] for r in rows} == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}
    assert all("input_precision" in r["error"] for r in rows if r["arch"] == "gfx90a")
    forward = next(r for r in rows if r["arch"] == "gfx942" and r["kernel"] == "_fwd_kernel")
    assert forward["lds"] > forward["lds_limit"] == 65536 and forward["mfma"] > 0


def test_gpu_family_of_every_target():
    """Which tiles a compute capability gets: wgmma tiles on sm_90 only, tcgen05-era tiles on sm_100-119, and the
    mma.sync tiles (<= 99 KiB shared memory) everywhere else, including sm_120 and any later or unknown part."""
    kernels = importlib.import_module("tte_flash.kernels.tte_attention")
    families = {arch: kernels._gpu_family(arch) for arch in (75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121, 130)}
    assert families == {75: "mma", 80: "mma", 86: "mma", 87: "mma", 89: "mma", 90: "hopper", 100: "blackwell",
                        103: "blackwell", 110: "blackwell", 120: "mma", 121: "mma", 130: "mma"}
    assert kernels._gpu_family("gfx942") == "hopper"  # ROCm: the shipped tiles, as before


@pytest.mark.skipif(sys.platform != "linux", reason="triton (and its ptxas) is Linux-only")
def test_pair_masks_compile_to_fewer_instructions_per_partial_tile(tmp_path):
    """The pair-mask what-if (``--config dq=.../pairs``: the dQ kernel's 16-bit dS masked two elements an instruction
    by inline PTX) compiles for sm_90 without spills, C7515 or losing wgmma, and every partial tile kind's loop runs
    fewer SASS instructions than the shipped kernel's (an int32 compare and a select per element), the full tile's
    the same: the PTX is accepted by ptxas and does what it is for."""
    runs = {}
    for name, config in (("shipped", []), ("paired", ["--config", "dq=128x64/w8/s2/pairs"])):  # both at once
        argv = [sys.executable, str(REPO / "benchmarks" / "compile_check.py"), "--kernels", "_bwd_dq_kernel",
                "--targets", "90", "--dtypes", "bfloat16", "--head-dims", "64", "--workers", "1", "--json",
                str(tmp_path / f"{name}.json"), *config]
        runs[name] = subprocess.Popen(argv, cwd=REPO, env=_script_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)

    def compiled(name):
        output = runs[name].communicate(timeout=900)[0]
        (row,) = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        assert runs[name].returncode == 0 and row["ok"] and not row["problems"], (row, output[-2000:])
        assert row["wgmma"] and row["spill_stores"] == 0 and row["c7515"] == 0
        return row
    shipped, paired = compiled("shipped"), compiled("paired")
    assert paired["config"].endswith("pairs") and not shipped["config"].endswith("pairs")
    assert set(paired["sass_kinds"]) == set(shipped["sass_kinds"]) == {"cut_lo", "cut_hi", "cut_lo_hi", "cut_any"}
    assert paired["sass_full"] == shipped["sass_full"]
    assert all(paired["sass_kinds"][kind] < shipped["sass_kinds"][kind] for kind in shipped["sass_kinds"]), (
        paired["sass_kinds"], shipped["sass_kinds"])


def test_kernel_check_passes_the_kernel_and_fails_a_wrong_one(monkeypatch):
    """The suite's correctness check: the real kernel passes on a random multi-sample packing; the kernel with
    the other mask flags (think tokens causal instead of bidirectional, COT seeing the query) fails it."""
    from benchmarks import kernel_check
    import tte_flash.kernels as kernels
    case = dict(tokens=83, q_heads=4, kv_heads=2, head_dim=16, dtype=torch.bfloat16, think_bidirectional=True,
                cot_sees_query=False, seed=3, device="cpu", slack=1e-3, longest=30)
    good = kernel_check.check_case(**case)
    assert good["samples"] >= 3 and good["ok"], good
    real = kernels.tte_attention

    def wrong_mask(q, k, v, seq_ids, types, *, think_bidirectional, cot_sees_query, **kw):
        return real(q, k, v, seq_ids, types, think_bidirectional=not think_bidirectional,
                    cot_sees_query=not cot_sees_query, **kw)
    monkeypatch.setattr(kernels, "tte_attention", wrong_mask)
    bad = kernel_check.check_case(**case)
    assert not bad["ok"] and "out" in bad["failed"]


def test_cot_loss_memory_benchmark_runs_and_both_losses_agree(tmp_path):
    """The benchmark end to end at small sizes: a row per method and head setting, the chunked and plain losses
    equal, the JSON written with the target verdict."""
    out = tmp_path / "cot.json"
    done = _script("cot_loss_memory.py", "--tokens", "300", "--hidden", "32", "--vocab", "5003", "--dtype",
                   "float32", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {(r["method"], r["head_trainable"]): r for r in result["rows"]}
    assert set(rows) == {("chunked", False), ("chunked", True), ("plain", False), ("plain", True)}
    assert rows["chunked", False]["loss_per_token"] == pytest.approx(rows["plain", False]["loss_per_token"], rel=1e-5)
    assert all(r["peak_added_bytes"] >= 0 for r in rows.values()) and "target_met" in result


def test_train_step_counts_the_work_it_times():
    """train_step's token, patch and pair counts equal an independent count from the records and the mask rule."""
    from benchmarks.train_step import _workload, synthetic_examples
    from tte_flash import TTEFlashModel
    from tte_flash.collator import TrainCollator
    model = TTEFlashModel.from_preset("tiny")
    collator = TrainCollator(model.processor, think_budgets=(4,), max_cot_tokens=12, packed=False)
    batch = collator(synthetic_examples(3, 0, (56, 84), cot_words=5))["train_batch"]
    tokens, patches, pairs = _workload(batch)
    want_tokens = want_pairs = want_patches = 0
    for query, cot, targets in zip(batch.queries, batch.cots, batch.targets):
        n_query, n_cot = query.input_ids.numel(), len(cot or [])
        # query tokens see the causal prefix; think/emb as well (causal); COT tokens see query+think+their prefix
        prefix = n_query + 4
        want_pairs += prefix * (prefix + 1) // 2 + (prefix + 1)
        want_pairs += sum(prefix + j + 1 for j in range(n_cot))
        want_tokens += prefix + 1 + n_cot
        want_patches += 0 if query.pixel_values is None else query.pixel_values.shape[0]
        for target in targets:
            n = target.input_ids.numel() + 1
            want_tokens += n
            want_pairs += n * (n + 1) // 2
            want_patches += 0 if target.pixel_values is None else target.pixel_values.shape[0]
    assert (tokens, patches, pairs) == (want_tokens, want_patches, want_pairs)


def test_gpu_suite_dry_run_writes_the_summary_and_fails_loudly(tmp_path, monkeypatch):
    """The one command, dry run, on the quick parts: every part ok, SUMMARY.md and summary.json written with the
    device, versions and headline numbers; a part that fails makes the suite exit 1 and is named."""
    from benchmarks import gpu_suite
    out = tmp_path / "suite"
    assert gpu_suite.main(["--dry-run", "--out", str(out), "--parts", "cot_loss", "train"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [p["part"] for p in summary["parts"]] == ["cot_loss", "train"]
    assert all(p["status"] == "ok" for p in summary["parts"]), summary["parts"]
    assert summary["meta"]["versions"]["torch"] and summary["headlines"]["train"]["seconds_per_step"] > 0
    text = (out / "SUMMARY.md").read_text()
    assert "dry run" in text and "## Training step" in text and "## COT loss peak memory" in text

    # a later call into the same folder (a GPU loan allows 10 minutes a command) keeps the parts run before;
    # a part run again never shows the earlier run's numbers (its files are removed before it starts)
    (out / "cot_loss_memory.json").write_text('{"rows": [{"method": "stale"}]}')
    assert gpu_suite.main(["--dry-run", "--out", str(out), "--parts", "cot_loss"]) == 0
    assert "stale" not in (out / "cot_loss_memory.json").read_text()
    assert gpu_suite.main(["--dry-run", "--out", str(out / "SUMMARY.md")]) == 2  # a file, not a folder
    again = json.loads((out / "summary.json").read_text())
    assert [p["part"] for p in again["parts"]] == ["cot_loss", "train"] and "train" in again["headlines"]

    failing = gpu_suite.Part("kernel", ["kernel_check.py", "--no-such-option"], 120, gating=True)
    monkeypatch.setattr(gpu_suite, "plan", lambda out, dry_run, quick: [failing])
    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path / "bad")]) == 1
    bad = json.loads((tmp_path / "bad" / "summary.json").read_text())
    # it crashed before any verdict (here a usage error; on the loan an ImportError): not wrong results
    assert bad["parts"][0]["status"] == "crashed" and not bad["parts"][0]["wrong_results"]


def test_gpu_suite_quick_plan_and_wrong_results_stop_the_suite(tmp_path, monkeypatch):
    """--quick: no compile part (that runs on a CPU), each of the two documented calls within 540 s, and
    --dry-run --quick runs the quick plan's parts; a kernel check with a failed case is WRONG RESULTS and stops
    the parts after it, where a crash does not."""
    from benchmarks import gpu_suite
    quick = gpu_suite.plan(tmp_path, dry_run=False, quick=True)
    names = [p.name for p in quick]
    assert "compile" not in names and set(names) == {"kernel", "attention", "cot_loss", "latency", "train"}
    limits = {p.name: p.limit_s for p in quick}
    assert limits["kernel"] + limits["attention"] <= 540
    assert limits["cot_loss"] + limits["latency"] + limits["train"] <= 540
    assert [p.name for p in gpu_suite.plan(tmp_path, dry_run=True, quick=True)] == names
    script = tmp_path / "wrong.py"
    script.write_text("import json, sys\nopen(sys.argv[2], 'a').write(json.dumps({'ok': False}) + '\\n')\n"
                      "sys.exit(1)\n")
    out = tmp_path / "wrong"
    parts = [gpu_suite.Part("kernel", [str(script), "--jsonl", str(out / "kernel_check.jsonl")], 60, gating=True),
             gpu_suite.Part("cot_loss", [str(script), "--jsonl", str(out / "other.jsonl")], 60)]
    monkeypatch.setattr(gpu_suite, "plan", lambda out, dry_run, quick: parts)
    assert gpu_suite.main(["--dry-run", "--out", str(out)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["part"], p["status"], p.get("wrong_results")) for p in summary["parts"]] == [("kernel", "failed", True)]
