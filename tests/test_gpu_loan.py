"""The device loan's script (benchmarks/gpu_loan.sh, gpu_loan.py): its budget fits the loan, what it leaves in $OUT
comes back, a killed job keeps its rows, a crash is not reported as wrong results, and the CPU rehearsal runs
both parts through the shell script on a bare copy of the tree."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import gpu_loan  # noqa: E402


def test_budget_fits_each_call_and_the_lease():
    assert gpu_loan.budget_problems() == []
    for part in gpu_loan.PARTS:
        jobs = gpu_loan.jobs_of(part)
        assert jobs[0].name == "env" and len({j.name for j in jobs}) == len(jobs)
        assert gpu_loan.deadline_s(part) <= 540 and gpu_loan.run_call(part)["timeout_s"] <= 600
    # compiling is done on a CPU before the loan, never on it
    assert not any("compile_check" in " ".join(j.argv) for j in gpu_loan.JOBS)


def test_readme_quotes_the_two_run_calls():
    readme = (REPO / "benchmarks" / "README.md").read_text()
    for part in gpu_loan.PARTS:
        call = gpu_loan.run_call(part)
        assert f'command="{call["command"]}", timeout_s={call["timeout_s"]}' in readme, part


def test_out_checker_catches_what_would_not_come_back(tmp_path):
    for i in range(8):
        (tmp_path / f"f{i}.json").write_text("{}")
    assert gpu_loan.out_problems(tmp_path) == []
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "ok.txt").write_text("x")
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    problems = "\n".join(gpu_loan.out_problems(tmp_path))
    assert "11 files" in problems and "deep.txt: more than 2 folders" in problems and "bad name.txt" in problems


def _fake_job(tmp_path, name, body):
    script = tmp_path / f"{name}.py"
    script.write_text("import json, sys, time\nrows = sys.argv[1]\n" + body)
    return gpu_loan.Job("z", name, [str(script), "{rows}"], 7, [str(script), "{rows}"])


def test_a_killed_job_keeps_its_rows_and_a_crash_is_not_wrong_results(tmp_path, monkeypatch):
    out = tmp_path / "out"
    jobs = [
        _fake_job(tmp_path, "slow", "open(rows, 'a').write(json.dumps({'source': 'slow', 'i': 0}) + '\\n')\n"
                                    "time.sleep(60)\n"),
        gpu_loan.Job("z", "kernel-check", [], 7, []),
        _fake_job(tmp_path, "wrong", "open(rows, 'a').write(json.dumps({'source': 'kernel_check', 'ok': False, "
                                     "'variant': 'packed', 'head_dim': 16}) + '\\n')\nsys.exit(1)\n"),
    ]
    jobs[2].name = "kernel-check"
    jobs[1].argv = [str(tmp_path / "crash.py")]  # an ImportError: a crash, not a failed check
    (tmp_path / "crash.py").write_text("import no_such_module\n")
    monkeypatch.setattr(gpu_loan, "JOBS", jobs[:2])
    monkeypatch.setattr(gpu_loan, "INSTALL_S", 0)
    import time
    assert gpu_loan.run_part("z", out, dry_run=False, t0=time.time(), deadline=30) == 1
    ends = [r for r in gpu_loan._read_jsonl(out / "z-jobs.jsonl") if r.get("event") == "end"]
    assert [(r["job"], r["status"]) for r in ends] == [("slow", "timed out"), ("kernel-check", "crashed")]
    assert any("no_such_module" in line for line in ends[1]["log_tail"])
    assert gpu_loan._read_jsonl(out / "z-rows.jsonl") == [{"source": "slow", "i": 0}]  # written before the kill
    assert "timed out" in (out / "z-SUMMARY.md").read_text()
    monkeypatch.setattr(gpu_loan, "JOBS", [jobs[2]])
    out2 = tmp_path / "out2"
    assert gpu_loan.run_part("z", out2, dry_run=False, t0=time.time(), deadline=30) == 1
    ends = [r for r in gpu_loan._read_jsonl(out2 / "z-jobs.jsonl") if r.get("event") == "end"]
    assert ends[0]["status"] == "WRONG RESULTS"
    assert gpu_loan.out_problems(out2) == []


@pytest.mark.slow
def test_rehearsal_runs_both_parts_on_a_bare_copy():
    """The CPU rehearsal (~2-3 minutes on 2 loaded cores): gpu_loan.sh a and b in dry-run mode in a copy of the
    tree that has no install and no .git; every job ok, rows from every script, <= 8 files back per part."""
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_loan.sh"), "--rehearse"], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable},  # this interpreter, not PATH's python3
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rehearsal passed" in done.stdout
    assert "files back from part a (6)" in done.stdout and "files back from part b (6)" in done.stdout


def test_the_link_it_makes_goes_when_the_part_ends(tmp_path):
    """In an uninstalled checkout gpu_loan.sh links tte_flash/kernels -> ../kernels for the part (the runner sees it)
    and removes it when the part ends, keeping the runner's exit status; a tree that has the name keeps it."""
    import shutil
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    (tree / "tte_flash").mkdir()
    (tree / "kernels").mkdir()
    (tree / "kernels" / "marker.txt").write_text("ours")
    shutil.copy2(REPO / "benchmarks" / "gpu_loan.sh", tree / "benchmarks" / "gpu_loan.sh")
    # a stand-in runner: reports what it sees through the link, exits 3
    (tree / "benchmarks" / "gpu_loan.py").write_text(
        "import pathlib, sys\nlink = pathlib.Path('tte_flash/kernels/marker.txt')\n"
        "print('SEEN', link.read_text() if link.exists() else None)\nsys.exit(3)\n")
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_loan.sh"), "a"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3 and "SEEN ours" in done.stdout, done.stdout + done.stderr
    assert not (tree / "tte_flash" / "kernels").is_symlink() and not (tree / "tte_flash" / "kernels").exists()
    (tree / "tte_flash" / "kernels").mkdir()  # an installed-like tree: its own folder, left alone
    done = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_loan.sh"), "a"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3 and "SEEN None" in done.stdout and (tree / "tte_flash" / "kernels").is_dir()


def test_rehearsal_flags_a_kernel_row_that_failed(tmp_path):
    """A provider that fails writes a row and its job still ends ok: the rehearsal's checks of a part name every
    tte-triton / tte-triton-block-order row that was not measured (the Triton 3.6 interpreter's failure under numpy
    2.5 passed the rehearsal that way), and not the rows of providers that may be unavailable on a CPU."""
    rows = [dict(kernel="tte_attention", provider="tte-triton", mode="fwd+bwd", layout="train", status="ok"),
            dict(kernel="tte_attention", provider="tte-triton", mode="fwd", layout="infer", status="failed",
                 reason="InterpreterError: only 0-dimensional arrays"),
            dict(kernel="tte_attention", provider="tte-triton-block-order", mode=None, layout="train",
                 status="wrong-results", check={"ok": False}),
            dict(kernel="tte_attention", provider="flex", mode=None, layout="train", status="unavailable")]
    (tmp_path / "a-rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = gpu_loan._part_problems("a", tmp_path, tmp_path)
    flagged = [p for p in problems if p.startswith(("tte-triton", "flex"))]
    assert len(flagged) == 2 and "InterpreterError" in flagged[0] and "wrong-results" in flagged[1], problems
