"""The latency benchmark's output: DESIGN §9 targets, the printed tables, the plot and the run's metadata."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

import tte_flash
from _common import versions

REPO = Path(__file__).resolve().parents[1]
TARGET_K, TARGET_N, TARGET_SPEEDUP, TARGET_OVERHEAD = 16, 128, 20.0, 1.10  # DESIGN.md §9


# ---------------------------------------------------------------------------------------------- targets

def _verdict(value: float, ci: list | None, target: float, at_least: bool) -> str:
    """'met' / 'not met' when the whole 95% CI is on one side of the target, else 'inconclusive'."""
    if ci is None:
        return "inconclusive"
    low, high = ci
    if at_least:
        return "met" if low >= target else "not met" if high < target else "inconclusive"
    return "met" if high <= target else "not met" if low > target else "inconclusive"


def check_targets(rows: list[dict], meta: dict) -> list[dict]:
    """DESIGN.md §9 inference targets, for every batch size that has the needed rows.

    ``value`` is the median per-round ratio; ``met`` compares it with the target; ``verdict`` says
    whether the 95% CI of that median clears the target, misses it, or straddles it.
    """
    applies = meta["device_type"] == "cuda" and meta["preset"] == "qwen2-vl-2b"
    main = [r for r in rows if r["sweep_query_tokens"] is None]
    targets = []
    for batch_size in sorted({r["batch_size"] for r in main}):
        find = {(r["provider"], r["think_tokens"], r["cot_tokens"]): r for r in main if r["batch_size"] == batch_size}
        tte, cot = find.get(("tte-flash", TARGET_K, 0)), find.get(("explicit-cot", 0, TARGET_N))
        if cot and cot["vs_tte"] is not None and tte:
            targets.append({"target": f"TTE-Flash K={TARGET_K} >= {TARGET_SPEEDUP:g}x faster than explicit CoT "
                                      f"N={TARGET_N}", "batch_size": batch_size, "value": cot["vs_tte"],
                            "ci95": cot["vs_tte_ci95"], "rounds": cot["rounds"],
                            "met": cot["vs_tte"] >= TARGET_SPEEDUP, "applies": applies,
                            "verdict": _verdict(cot["vs_tte"], cot["vs_tte_ci95"], TARGET_SPEEDUP, at_least=True)})
        if tte and tte["vs_k0"] is not None:
            targets.append({"target": f"TTE-Flash K={TARGET_K} <= {TARGET_OVERHEAD:.2f}x the K=0 baseline",
                            "batch_size": batch_size, "value": tte["vs_k0"], "ci95": tte["vs_k0_ci95"],
                            "rounds": tte["rounds"], "met": tte["vs_k0"] <= TARGET_OVERHEAD, "applies": applies,
                            "verdict": _verdict(tte["vs_k0"], tte["vs_k0_ci95"], TARGET_OVERHEAD, at_least=False)})
    return targets


# ---------------------------------------------------------------------------------------------- tables

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def fmt_ratio(row: dict, key: str) -> str:
    """``1.03x [0.99-1.08]``: the median per-round ratio and its 95% CI (``-`` where there is none)."""
    if row[key] is None:
        return "-"
    ci = row[f"{key}_ci95"]
    return f"{row[key]:.2f}x" + (f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else " [n<6]")


def print_table(rows: list[dict], reference_k: int, show_mfu: bool, title: str) -> None:
    columns = ["config", "batch", "q tok", "median ms", "IQR ms", "queries/s", "vs K=0 [95% CI]",
               f"vs K={reference_k} [95% CI]", "rounds", "peak MB", "TFLOP/s"] + (["MFU"] if show_mfu else [])
    table = [[r["label"] if r["sweep_query_tokens"] is None else f"{r['label']} L={r['sweep_query_tokens']}",
              str(r["batch_size"]), f"{r['query_tokens_mean']:.0f}", f"{r['median_ms']:.2f}", f"{r['iqr_ms']:.2f}",
              f"{r['queries_per_s']:.1f}", fmt_ratio(r, "vs_k0"), fmt_ratio(r, "vs_tte"), str(r["rounds"]),
              _fmt(r["peak_mem_mb"], ".0f"), f"{r['tflops_per_s']:.3g}"] + ([_fmt(r["mfu"], ".1%")] if show_mfu else [])
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(columns, widths))))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))))


def print_sweep_summary(rows: list[dict]) -> None:
    """Per query length: what each K adds, in latency (median per-round ratio) and in tokens."""
    print("\nQuery-length sweep: latency added by K think tokens vs tokens added")
    for length in sorted({r["sweep_query_tokens"] for r in rows}):
        at = {r["think_tokens"]: r for r in rows if r["sweep_query_tokens"] == length}
        base = at.get(0)
        if not base:
            print(f"  L={length}: no K=0")
            continue
        parts = [f"K={k}: {fmt_ratio(r, 'vs_k0')} latency, +{k / (length + 1):.1%} tokens"
                 for k, r in sorted(at.items()) if k]
        print(f"  L={length:<5} K=0 {base['median_ms']:.2f} ms; " + "; ".join(parts))


def print_targets(targets: list[dict]) -> None:
    if not targets:
        return
    print("\nTargets (DESIGN.md §9; they are for a GPU with the qwen2-vl-2b preset):")
    for t in targets:
        note = "" if t["applies"] else "  (informational: not a GPU + qwen2-vl-2b run)"
        ci = f" [95% CI {t['ci95'][0]:.2f}-{t['ci95'][1]:.2f}]" if t["ci95"] else " [no CI: under 6 rounds]"
        print(f"  batch {t['batch_size']:>3}: {t['target']}: {t['value']:.2f}x{ci} over {t['rounds']} rounds -> "
              f"{t['verdict'].upper()}{note}")


# ---------------------------------------------------------------------------------------------- plot

def _error_bars(points: list[tuple]) -> list[list[float]]:
    """Asymmetric error bars from (x, median, ci, iqr) points: the 95% CI, the IQR where there is none."""
    low, high = [], []
    for _, median, ci, iqr in points:
        lo, hi = ci or iqr
        low.append(max(median - lo, 0.0))
        high.append(max(hi - median, 0.0))
    return [low, high]


def _ratio_curve(ax, points: list[tuple], **style) -> None:
    points = sorted(points, key=lambda p: p[0])
    ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=_error_bars(points), capsize=3, **style)


def _reference_lines(ax) -> None:
    ax.axhline(1.0, color="grey", lw=1)
    ax.axhline(TARGET_OVERHEAD, color="tab:red", ls=":", lw=1.2, label=f"target {TARGET_OVERHEAD:.2f}x")


def plot(rows: list[dict], path: str, meta: dict, reference_k: int) -> None:
    """Ratios to K=0 vs K, vs N and (with a sweep) vs query length, with 95% CI bars; absolute ms vs K."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    main = [r for r in rows if r["sweep_query_tokens"] is None]
    sweep = [r for r in rows if r["sweep_query_tokens"] is not None]
    fig, axes = plt.subplots(1, 4 if sweep else 3, figsize=(20 if sweep else 15, 4.6), squeeze=False)
    axes = axes[0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def point(r, x, key="vs_k0"):
        return x, r[key], r[f"{key}_ci95"], r[f"{key}_iqr"]
    for i, batch_size in enumerate(sorted({r["batch_size"] for r in main})):
        colour = colours[i % len(colours)]
        latent = [r for r in main if r["batch_size"] == batch_size and r["provider"] != "explicit-cot"]
        cot = [r for r in main if r["batch_size"] == batch_size and r["provider"] == "explicit-cot"]
        _ratio_curve(axes[0], [point(r, r["think_tokens"]) for r in latent], fmt="o-", color=colour,
                     label=f"batch {batch_size}")
        if cot:
            _ratio_curve(axes[1], [point(r, r["cot_tokens"]) for r in cot], fmt="s-", color=colour,
                         label=f"explicit CoT, batch {batch_size}")
            tte = [r for r in latent if r["think_tokens"] == reference_k]
            if tte:
                axes[1].axhline(tte[0]["vs_k0"], color=colour, ls="--", lw=1)
        absolute = [(r["think_tokens"], r["median_ms"], None, r["quartiles_ms"]) for r in latent]
        _ratio_curve(axes[2], absolute, fmt="o-", color=colour, label=f"batch {batch_size}")
    _reference_lines(axes[0])
    axes[0].set(xlabel="think tokens K", ylabel="latency / K=0 latency (median of per-round ratios)",
                title="TTE-Flash: cost of K think tokens")
    axes[1].axhline(1.0, color="grey", lw=1)
    axes[1].set(xlabel="generated CoT tokens N", ylabel="latency / K=0 latency", yscale="log",
                title=f"Explicit CoT vs N (dashed: TTE-Flash K={reference_k})")
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
    axes[2].set(xlabel="think tokens K", ylabel="median latency per batch (ms), bars: quartiles",
                title="TTE-Flash: absolute latency")
    for i, k in enumerate(sorted({r["think_tokens"] for r in sweep} - {0})):
        _ratio_curve(axes[3], [point(r, r["query_tokens_mean"]) for r in sweep if r["think_tokens"] == k],
                     fmt="o-", color=colours[i % len(colours)], label=f"K={k}")
    if sweep:
        _reference_lines(axes[3])
        axes[3].set(xlabel="query tokens", ylabel="latency / K=0 latency",
                    title=f"K think tokens vs query length (batch {sweep[0]['batch_size']})")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    rounds = [r["rounds"] for r in rows]
    fig.suptitle(f"{meta['preset']} on {meta['device_name']} ({meta['dtype']}, attn {meta['attn']}), "
                 f"commit {meta['git_commit'][:10]}; bars: 95% CI of the median ratio "
                 f"({min(rounds)}-{max(rounds)} interleaved rounds; IQR where under 6)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- metadata

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args, device: torch.device) -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device_type": device.type, "device_name": name, "cpu_threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "dtype": args.dtype, "preset": args.preset, "attn": args.attn,
            "versions": {"python": platform.python_version(), "cuda": torch.version.cuda, **versions(),
                         "tte_flash": getattr(tte_flash, "__version__", None)},
            "git_commit": git("rev-parse", "HEAD") or "unknown",
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "platform": platform.platform(), "settings": dict(vars(args))}
