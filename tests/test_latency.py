"""benchmarks/latency.py on the tiny preset: the output's structure, never a timing."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"


@pytest.fixture(scope="module")
def latency():
    spec = importlib.util.spec_from_file_location("latency_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(latency, tmp_path_factory):
    out = tmp_path_factory.mktemp("latency")
    argv = ["--device", "cpu", "--think_tokens", "3", "--cot-tokens", "4", "--batch-sizes", "1", "2",
            "--repeats", "1", "--warmup", "0", "--image-size", "96x64", "--sweep-query-length", "100", "150",
            "--json", str(out / "latency.json"), "--plot", str(out / "latency.png")]
    result = latency.main(argv)
    return result, out


def test_rows_for_every_config_with_consistent_ratios(run):
    result, out = run
    assert json.loads((out / "latency.json").read_text()) == json.loads(json.dumps(result))
    main = [r for r in result["rows"] if r["sweep_query_tokens"] is None]
    configs = {(r["provider"], r["think_tokens"], r["cot_tokens"], r["batch_size"]) for r in main}
    assert configs == {(p, k, n, b) for b in (1, 2)
                       for p, k, n in [("baseline", 0, 0), ("tte-flash", 3, 0), ("explicit-cot", 0, 4)]}
    assert len(main) == len(configs)
    required = {"label", "median_ms", "p90_ms", "queries_per_s", "vs_k0", "vs_tte", "peak_mem_mb", "n_runs",
                "query_tokens_mean", "model_flops", "tflops_per_s", "mfu"}
    for row in result["rows"]:
        assert required <= set(row)
        assert row["n_runs"] == 1 and row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] - 1e-9
        assert math.isclose(row["queries_per_s"], row["batch_size"] / row["median_ms"] * 1e3)
        assert row["mfu"] is None and row["peak_mem_mb"] is None  # CPU: neither is measured
    for b in (1, 2):
        by = {r["provider"]: r for r in main if r["batch_size"] == b}
        assert math.isclose(by["explicit-cot"]["vs_k0"], by["explicit-cot"]["median_ms"] / by["baseline"]["median_ms"])
        assert math.isclose(by["explicit-cot"]["vs_tte"], by["explicit-cot"]["median_ms"] / by["tte-flash"]["median_ms"])
        assert by["baseline"]["vs_k0"] == 1.0 and by["tte-flash"]["vs_tte"] == 1.0
        # explicit CoT does strictly more model work than the latent path (FLOPs, not time)
        assert by["explicit-cot"]["model_flops"] > by["tte-flash"]["model_flops"] > by["baseline"]["model_flops"]
    assert (out / "latency.png").stat().st_size > 10_000


def test_meta_and_sweep(run):
    result, _ = run
    meta = result["meta"]
    assert meta["device_type"] == "cpu" and meta["preset"] == "tiny" and meta["dtype"] == "float32"
    assert meta["attn"] == "reference" and meta["reference_think_tokens"] == 3
    assert {"torch", "transformers", "triton"} <= set(meta["versions"]) and meta["git_commit"]
    assert meta["settings"]["cot_tokens"] == [4]
    sweep = [r for r in result["rows"] if r["sweep_query_tokens"] is not None]
    assert {(r["sweep_query_tokens"], r["think_tokens"]) for r in sweep} == {(100, 0), (100, 3), (150, 0), (150, 3)}
    for row in sweep:
        assert row["batch_size"] == 1 and row["query_tokens_mean"] == row["sweep_query_tokens"]
    # no K=16 / N=128 configs here, so no DESIGN §9 target is checked
    assert result["targets"] == []


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


def test_triton_on_cpu_is_a_clear_error(latency, capsys):
    with pytest.raises(SystemExit):
        latency.parse_args(["--device", "cpu", "--attn", "triton"])
    assert "needs a CUDA device" in capsys.readouterr().err


def test_a_bad_sweep_stops_before_timing_and_results_are_saved_by_default(latency, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(latency, "run_configs", lambda *a, **k: calls.append(1) or [])
    with pytest.raises(SystemExit, match="query length 10 is below"):
        latency.main(["--device", "cpu", "--think_tokens", "3", "--cot-tokens", "--batch-sizes", "1",
                      "--image-size", "96x64", "--sweep-query-length", "200", "10"])
    assert calls == []  # nothing was timed
    monkeypatch.undo()
    monkeypatch.setattr(latency, "__file__", str(tmp_path / "benchmarks" / "latency.py"))  # results/ beside it
    latency.main(["--device", "cpu", "--think_tokens", "3", "--cot-tokens", "--batch-sizes", "1", "--repeats", "1",
                  "--warmup", "0", "--image-size", "96x64"])
    saved = sorted(p.suffix for p in (tmp_path / "benchmarks" / "results").iterdir())
    assert saved == [".json", ".png"] and "wrote" in capsys.readouterr().out
