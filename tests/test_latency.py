"""benchmarks/latency.py: ratio statistics on constructed timings, the interleaving, and the CLI on the tiny preset.

Nothing here asserts on a real timing: the statistics get timings built with a known answer, and
the end-to-end runs check the output's structure and that its ratios follow from its own raw times.
"""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "latency.py"


@pytest.fixture(scope="module")
def latency():
    spec = importlib.util.spec_from_file_location("latency_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)  # puts benchmarks/ on sys.path for its _latency_* modules
    return module


@pytest.fixture(scope="module")
def timing(latency):
    import _latency_timing
    return _latency_timing


# ---------------------------------------------------------------------------------------------- statistics

def median_ci_by_order_statistics(values, confidence=0.95):
    """Independent reference: [x_(k), x_(n+1-k)] with the largest k such that P(Binom(n, 1/2) <= k-1) <= alpha/2."""
    x, n = sorted(values), len(values)
    tail = lambda k: sum(math.comb(n, i) for i in range(k)) / 2 ** n  # noqa: E731  P(B <= k-1)
    k = 0
    while tail(k + 1) <= (1 - confidence) / 2:
        k += 1
    return None if k == 0 else (x[k - 1], x[n - k])


def test_ratio_stats_known_answer(timing):
    """Ratios 1.00..1.10 hidden under a 100x drift: median 1.05, quartiles 1.025/1.075, CI [x_(2), x_(10)]."""
    rng = np.random.default_rng(0)
    ratios = rng.permutation(np.round(np.linspace(1.0, 1.1, 11), 10))
    reference = np.exp(rng.uniform(0, math.log(100), 11)) * 1e-3  # K=0 calls from 1 ms to 100 ms
    stats = timing.ratio_stats(reference * ratios, reference)
    assert stats["median"] == pytest.approx(1.05) and stats["rounds"] == 11
    assert stats["iqr"] == pytest.approx([1.025, 1.075])
    # n=11: P(B<=1) = 12/2048 <= 0.025 < P(B<=2) = 67/2048, so the CI is the 2nd and 10th smallest
    assert stats["ci95"] == pytest.approx((1.01, 1.09))
    # the ratio of the two medians is thrown off by the drift; the per-round ratio is not
    assert abs(np.median(reference * ratios) / np.median(reference) - 1.05) > 0.01


@pytest.mark.parametrize("n", [2, 5, 6, 7, 20, 61, 200])
def test_median_ci_matches_order_statistics(timing, n):
    values = np.random.default_rng(n).lognormal(0, 0.5, n)
    expected = median_ci_by_order_statistics(values)
    got = timing.median_ci(values)
    if expected is None:  # n < 6 at 95%
        assert got is None
    else:
        assert got == pytest.approx(expected)
        assert got[0] <= np.median(values) <= got[1]


def test_ratio_stats_rejects_bad_input(timing):
    with pytest.raises(ValueError, match="equal-length"):
        timing.ratio_stats([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        timing.ratio_stats([1.0, 2.0], [1.0, 0.0])


def test_time_stats_known_answer(timing):
    stats = timing.time_stats([0.004, 0.001, 0.1, 0.003, 0.002])  # seconds, one slow outlier
    assert stats["median_ms"] == pytest.approx(3.0) and stats["iqr_ms"] == pytest.approx(2.0)
    assert stats["p90_ms"] == pytest.approx(4 + 0.6 * 96) and stats["mean_ms"] == pytest.approx(22.0)
    assert stats["min_ms"] == pytest.approx(1.0) and stats["quartiles_ms"] == pytest.approx([2.0, 4.0])


# ---------------------------------------------------------------------------------------------- interleaving

class FakeMachine:
    """A clock and callables that advance it: call i of config j takes base[j] * drift(call index)."""

    def __init__(self, base, drift=lambda t: 1.0):
        self.now, self.calls, self.base, self.drift = 0.0, [], base, drift

    def clock(self):
        return self.now

    def fn(self, j):
        def call():
            self.now += self.base[j] * self.drift(len(self.calls))
            self.calls.append(j)
            return {"config": j}
        return call


def run(timing, machine, **kwargs):
    settings = dict(device=torch.device("cpu"), warmup=0, min_rounds=6, max_rounds=1000, max_seconds=0.0,
                    precision=0.0, clock=machine.clock) | kwargs
    return timing.measure([machine.fn(j) for j in range(len(machine.base))], **settings)


def test_rounds_interleave_in_rotating_order(timing):
    machine = FakeMachine([1.0, 2.0, 3.0])
    timings = run(timing, machine, warmup=2, min_rounds=4)
    warmup, timed = [0, 1, 2, 1, 2, 0], [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]
    assert machine.calls == warmup + timed and timings.order == timed
    assert timings.rounds == 4 and timings.stopped == "max-seconds"
    assert timings.times == [[1.0] * 4, [2.0] * 4, [3.0] * 4]
    assert timings.outputs == [{"config": 0}, {"config": 1}, {"config": 2}]
    assert timings.peak_bytes == [None] * 3  # CPU: not measured


def test_rotation_cancels_a_steady_drift(timing):
    """Machine slowing down by 10% of its start speed per call: the per-round ratio stays at the truth."""
    machine = FakeMachine([10.0, 11.0], drift=lambda t: 1 + 0.1 * t)
    timings = run(timing, machine, min_rounds=200, max_rounds=200)
    stats = timing.ratio_stats(timings.times[1], timings.times[0])
    assert stats["median"] == pytest.approx(1.1, rel=2e-3)
    assert stats["ci95"][0] <= 1.1 <= stats["ci95"][1]
    # were K=0 always first, every round would be biased upward
    first_always = [11 * (1 + 0.1 * (2 * r + 1)) / (10 * (1 + 0.1 * 2 * r)) for r in range(200)]
    assert np.median(first_always) > 1.1 * 1.002


def test_rounds_stop_at_precision_or_budget(timing):
    exact = run(timing, FakeMachine([1.0, 1.2]), min_rounds=6, max_seconds=1e9, precision=0.01)
    assert exact.rounds == 6 and exact.stopped == "precision"  # zero noise: narrow at the first chance
    rng = np.random.default_rng(0)
    noisy = FakeMachine([1.0, 1.2], drift=lambda t: rng.lognormal(0, 1.0))
    budget = run(timing, noisy, min_rounds=6, max_seconds=500.0, precision=0.001)
    assert budget.stopped == "max-seconds" and budget.seconds >= 500.0
    assert budget.seconds - sum(budget.times[0][-1:] + budget.times[1][-1:]) < 500.0  # the last round began in time
    capped = run(timing, noisy, min_rounds=6, max_rounds=9, max_seconds=1e9, precision=0.001)
    assert capped.rounds == 9 and capped.stopped == "max-rounds"
    with pytest.raises(ValueError, match="min_rounds"):
        run(timing, noisy, min_rounds=10, max_rounds=9)


# ---------------------------------------------------------------------------------------------- CLI, tiny preset

@pytest.fixture(scope="module")
def cli_run(latency, tmp_path_factory):
    out = tmp_path_factory.mktemp("latency")
    argv = ["--device", "cpu", "--think_tokens", "3", "--cot-tokens", "4", "--batch-sizes", "1", "2",
            "--repeats", "6", "--max-seconds", "0", "--precision", "0", "--warmup", "0", "--image-size", "96x64",
            "--sweep-query-length", "100", "150",
            "--json", str(out / "latency.json"), "--plot", str(out / "latency.png")]
    return latency.main(argv), out


def test_rows_for_every_config_with_ratios_from_their_rounds(cli_run):
    result, out = cli_run
    assert json.loads((out / "latency.json").read_text()) == json.loads(json.dumps(result))
    main = [r for r in result["rows"] if r["sweep_query_tokens"] is None]
    configs = {(r["provider"], r["think_tokens"], r["cot_tokens"], r["batch_size"]) for r in main}
    assert configs == {(p, k, n, b) for b in (1, 2)
                       for p, k, n in [("baseline", 0, 0), ("tte-flash", 3, 0), ("explicit-cot", 0, 4)]}
    assert len(main) == len(configs)  # the CoT groups' K=0 / K=3 anchors get no rows
    for row in result["rows"]:
        times, k0_times = np.array(row["times_ms"]), np.array(row["k0_times_ms"])
        assert row["rounds"] == row["n_runs"] == len(times) == len(k0_times) == 6 and row["stopped"] == "max-seconds"
        assert row["median_ms"] == pytest.approx(np.median(times), rel=1e-4)
        assert row["vs_k0"] == pytest.approx(np.median(times / k0_times), rel=1e-3)
        ratios = times / k0_times  # 6 rounds: the CI of the median is their range
        assert row["vs_k0_ci95"] == pytest.approx([min(ratios), max(ratios)], rel=1e-3)
        assert row["vs_k0_of_medians"] == pytest.approx(np.median(times) / np.median(k0_times), rel=1e-3)
        assert math.isclose(row["queries_per_s"], row["batch_size"] / row["median_ms"] * 1e3)
        assert row["mfu"] is None and row["peak_mem_mb"] is None  # CPU: neither is measured
    for b in (1, 2):
        by = {r["provider"]: r for r in main if r["batch_size"] == b}
        assert by["baseline"]["vs_k0"] == 1.0 and by["tte-flash"]["vs_tte"] == 1.0
        assert by["baseline"]["times_ms"] == by["baseline"]["k0_times_ms"]
        assert by["tte-flash"]["k0_times_ms"] == by["baseline"]["times_ms"]  # one group: the same K=0 calls
        assert by["explicit-cot"]["vs_tte"] is not None  # K=3 timed beside it as an anchor
        # explicit CoT does strictly more model work than the latent path (FLOPs, not time)
        assert by["explicit-cot"]["model_flops"] > by["tte-flash"]["model_flops"] > by["baseline"]["model_flops"]
    assert (out / "latency.png").stat().st_size > 10_000


def test_meta_and_sweep(cli_run):
    result, _ = cli_run
    meta = result["meta"]
    assert meta["device_type"] == "cpu" and meta["preset"] == "tiny" and meta["dtype"] == "float32"
    assert meta["attn"] == "reference" and meta["reference_think_tokens"] == 3
    assert {"torch", "transformers", "triton", "python"} <= set(meta["versions"]) and meta["git_commit"]
    assert meta["settings"]["cot_tokens"] == [4] and meta["settings"]["repeats"] == 6
    sweep = [r for r in result["rows"] if r["sweep_query_tokens"] is not None]
    assert {(r["sweep_query_tokens"], r["think_tokens"]) for r in sweep} == {(100, 0), (100, 3), (150, 0), (150, 3)}
    for row in sweep:
        assert row["batch_size"] == 1 and row["query_tokens_mean"] == row["sweep_query_tokens"]
    # no K=16 / N=128 configs here, so no DESIGN §9 target is checked
    assert result["targets"] == []


def test_targets_use_the_per_round_ratio_and_its_interval(latency):
    import _latency_report as report
    row = dict(sweep_query_tokens=None, batch_size=8, cot_tokens=0, rounds=40)
    rows = [dict(row, provider="baseline", think_tokens=0, vs_k0=1.0, vs_k0_ci95=[1.0, 1.0]),
            dict(row, provider="tte-flash", think_tokens=16, vs_k0=1.08, vs_k0_ci95=[1.05, 1.12]),
            dict(row, provider="explicit-cot", think_tokens=0, cot_tokens=128, vs_k0=30.0, vs_tte=25.0,
                 vs_tte_ci95=[22.0, 27.0])]
    targets = report.check_targets(rows, {"device_type": "cuda", "preset": "qwen2-vl-2b"})
    speed, overhead = targets
    assert speed["value"] == 25.0 and speed["met"] and speed["verdict"] == "met" and speed["applies"]
    assert overhead["value"] == 1.08 and overhead["met"] and overhead["verdict"] == "inconclusive"  # CI spans 1.10
    rows[1]["vs_k0_ci95"] = [1.11, 1.2]
    assert report.check_targets(rows, {"device_type": "cpu", "preset": "tiny"})[1]["verdict"] == "not met"


def test_explicit_cot_generates_exactly_n_tokens(latency):
    bench = latency.build_bench("tiny", torch.device("cpu"), torch.float32, "reference", seed=0)
    records = [bench.model.processor(q) for q in latency.make_queries(2, 0, (64, 64))]
    traces = latency.generate_traces(bench, records, 7)
    assert [len(t) for t in traces] == [7, 7]


def test_sdpa_path_gives_the_package_embedding(latency):
    """--attn sdpa (left-padded, transformers' attention, last token) embeds like the packed TTE path."""
    queries = latency.make_queries(3, 1, (80, 60))
    queries[1]["text"] += " and a longer question so that the batch needs padding"
    ours = latency.build_bench("tiny", torch.device("cpu"), torch.float32, "reference", seed=0)
    plain = latency.build_bench("tiny", torch.device("cpu"), torch.float32, "sdpa", seed=0)
    records = [ours.model.processor(q) for q in queries]
    for k in (0, 5):
        torch.testing.assert_close(latency.embed(plain, records, k), latency.embed(ours, records, k),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--attn", "triton"], "needs a CUDA device"),
    (["--repeats", "10", "--max-rounds", "5"], "--max-rounds 5 is below --repeats 10"),
    (["--precision", "-1"], "must be >= 0"),
])
def test_bad_arguments_are_clear_errors(latency, capsys, argv, message):
    with pytest.raises(SystemExit):
        latency.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


def test_a_bad_sweep_stops_before_timing_and_results_are_saved_by_default(latency, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(latency, "run_configs", lambda *a, **k: calls.append(1) or [])
    with pytest.raises(SystemExit, match="query length 10 is below"):
        latency.main(["--device", "cpu", "--think_tokens", "3", "--cot-tokens", "--batch-sizes", "1",
                      "--image-size", "96x64", "--sweep-query-length", "200", "10"])
    assert calls == []  # nothing was timed
    monkeypatch.undo()
    fast = ["--device", "cpu", "--think_tokens", "3", "--cot-tokens", "--batch-sizes", "1", "--repeats", "1",
            "--max-seconds", "0", "--warmup", "0", "--image-size", "96x64"]
    monkeypatch.setattr(latency, "__file__", str(tmp_path / "benchmarks" / "latency.py"))  # results/ beside it
    result = latency.main(fast + ["--no-save"])
    assert not (tmp_path / "benchmarks").exists() and [r["rounds"] for r in result["rows"]] == [1, 1]
    assert "wrote" not in capsys.readouterr().out
    latency.main(fast)
    saved = sorted(p.suffix for p in (tmp_path / "benchmarks" / "results").iterdir())
    assert saved == [".json", ".png"] and "wrote" in capsys.readouterr().out
