"""Peak memory of ``encode`` against the number of inputs: is it flat?

For each corpus size N (default 1k, 3k, 10k) a fresh worker process builds the ``tiny`` preset, warms up,
then embeds N inputs read lazily from a generator: every second input an image (random pixels, a random
size up to the preset's pixel budget, made on the fly), the others texts of random length. The worker
reports its peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the real high-water mark
of the process, torch's allocations, Python objects and PIL buffers alike) and the peak before the corpus
(after loading the model and a warm-up batch). One process per size, so each high-water mark is its own.

The table gives peak RSS, growth over the warm-up peak, and the slope of a least-squares line through
(N, peak) in MiB per 1k inputs. What stays in memory by design: the output array (N x hidden x 4 bytes:
0.25 MiB per 1k inputs at the tiny preset's 64 dims). The rest of the slope is native memory, not Python
objects (tracemalloc stays flat): the C allocator's fragmentation and library caches keyed by tensor
shape, such as oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`` turns it off).
``--source list`` materialises the inputs first (the caller's memory, not encode's); ``--repo DIR`` runs the
workers against another checkout (e.g. ``git archive <commit> | tar -x -C DIR``) to compare implementations.

``--source parquet`` measures the command-line path on a file: the parent writes N text rows (the texts above,
``id`` and ``text`` columns, ``--row_group_size`` rows per row group) to a Parquet file, and the worker runs
``tte-flash encode --input corpus.parquet --role document --output embs/`` in-process (``tte_flash.cli.main``:
the file streamed by ``tte_flash.data.iter_rows``, shards written to disk). Its warm-up is the same command on
64 rows. Target (issue 17): the peak at 100k rows within 10% of the peak at 10k.

``--video`` (needs PyAV) measures a video file instead: a 30 s 640x360 30 fps H.264 clip, peak RSS of
``load_video_frames`` (8 sampled frames, seeking) against decoding every frame and then sampling.

    python benchmarks/encode_memory.py                       # 1k, 3k, 10k; writes benchmarks/results/
    python benchmarks/encode_memory.py --video --no-save     # the video clip
    python benchmarks/encode_memory.py --sizes 1000 3000 10000 100000 --no-save
    python benchmarks/encode_memory.py --source parquet --sizes 10000 100000   # tte-flash encode on a Parquet file
    mkdir /tmp/before && git archive ea1a46e | tar -x -C /tmp/before        # the eager encode
    python benchmarks/encode_memory.py --repo /tmp/before --tag before
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def corpus(n: int, seed: int = 0, max_side: int = 224):
    """N inputs made on the fly: even indices are images (random size and pixels), odd ones texts."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(n):
        if i % 2 == 0:
            height, width = (int(x) for x in rng.integers(28, max_side + 1, 2))
            yield {"image": Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))}
        else:
            yield " ".join(f"w{int(x)}" for x in rng.integers(0, 1000, int(rng.integers(3, 120))))


def texts(n: int, seed: int = 0, max_words: int = 119):
    """N texts of 3 to ``max_words`` random words (119: the texts of ``corpus``)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield " ".join(f"w{int(x)}" for x in rng.integers(0, 1000, int(rng.integers(3, max_words + 1))))


def write_parquet(path: Path, n: int, row_group_size: int, seed: int = 0, max_words: int = 119):
    """N text rows (``id``, ``text``) written in row groups of ``row_group_size`` rows, a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    stream = texts(n, seed, max_words)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, row_group_size):
            count = min(row_group_size, n - start)
            chunk = [next(stream) for _ in range(count)]
            writer.write_table(pa.table({"id": list(range(start, start + count)), "text": chunk}, schema=schema))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak() -> bool:
    """Reset the kernel's high-water mark of this process (``VmHWM``; Linux 4.0+: ``clear_refs`` 5), so that
    :func:`window_peak_mib` is the peak since now; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_status_mib(field: str) -> float | None:
    """A size from ``/proc/self/status`` in MiB: ``VmHWM`` (the peak since :func:`reset_peak`, which resets
    ``ru_maxrss`` too) or ``VmRSS`` (now); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def worker(args) -> dict:
    """Runs in its own process: one corpus size, one peak."""
    if args.repo:
        sys.path.insert(0, str(Path(args.repo).resolve()))
    if args.source == "parquet":
        return parquet_worker(args)
    import torch

    import tte_flash
    from tte_flash import TTEFlashModel
    torch.manual_seed(0)
    model = TTEFlashModel.from_preset(args.preset).eval()
    model.encode_document(list(corpus(64, seed=1)), batch_size=args.batch_size)  # warm-up: one-time allocations
    before = peak_rss_mib()
    inputs = corpus(args.worker)
    if args.source == "list":
        inputs = list(inputs)
    start = time.perf_counter()
    out = model.encode_document(inputs, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    assert out.shape[0] == args.worker
    return {"n": args.worker, "peak_rss_mib": round(peak_rss_mib(), 1), "warmup_peak_rss_mib": round(before, 1),
            "growth_mib": round(peak_rss_mib() - before, 1), "seconds": round(seconds, 1),
            "inputs_per_s": round(args.worker / seconds, 1), "output_mib": round(out.nbytes / 2**20, 2),
            "tte_flash": str(Path(tte_flash.__file__).parent)}


def parquet_worker(args) -> dict:
    """``tte-flash encode --input <parquet> --output <shards>`` in this process, after a 64-row warm-up run."""
    import tempfile

    import tte_flash
    from tte_flash.cli import main as cli
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_parquet(tmp / "warm.parquet", 64, 64, seed=1)
        common = ["--model", args.preset, "--role", "document", "--batch_size", str(args.batch_size)]
        assert cli(["encode", "--input", str(tmp / "warm.parquet"), "--output", str(tmp / "warm"), *common]) == 0
        before, resident = peak_rss_mib(), proc_status_mib("VmRSS")
        reset = reset_peak()
        start = time.perf_counter()
        assert cli(["encode", "--input", args.parquet, "--output", str(tmp / "embs"), *common]) == 0
        seconds = time.perf_counter() - start
        encode_peak = proc_status_mib("VmHWM") if reset else None
        peak = max(before, encode_peak or peak_rss_mib())  # the process's high-water mark, warm-up included
        manifest = json.loads((tmp / "embs" / "manifest.json").read_text())
    assert manifest["total"] == args.worker, manifest["total"]
    return {"n": args.worker, "peak_rss_mib": round(peak, 1), "warmup_peak_rss_mib": round(before, 1),
            "growth_mib": round(peak - before, 1), "seconds": round(seconds, 1),
            # the peak while the N rows were encoded alone (the warm-up's high-water mark reset before), and the
            # resident size when that started
            "encode_peak_rss_mib": None if encode_peak is None else round(encode_peak, 1),
            "rss_before_encode_mib": None if resident is None else round(resident, 1),
            "inputs_per_s": round(args.worker / seconds, 1), "num_shards": manifest["num_shards"],
            "parquet_mib": round(Path(args.parquet).stat().st_size / 2**20, 2),
            "tte_flash": str(Path(tte_flash.__file__).parent)}


def write_clip(path: Path, seconds: int = 30, fps: int = 30, width: int = 640, height: int = 360):
    import av
    import numpy as np
    base = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1), format="rgb24")  # a panning picture
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_worker(args) -> dict:
    """Runs in its own process: one way of reading 8 frames of the clip."""
    if args.repo:
        sys.path.insert(0, str(Path(args.repo).resolve()))
    import av

    from tte_flash.media import load_video_frames, sample_frame_indices
    before, start = peak_rss_mib(), time.perf_counter()
    if args.video_worker == "decode-all":
        with av.open(args.clip) as container:
            frames = [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
        frames = [frames[i] for i in sample_frame_indices(len(frames), 8)]
    else:
        frames = load_video_frames(Path(args.clip), 8)
    return {"method": args.video_worker, "frames": len(frames), "peak_rss_mib": round(peak_rss_mib(), 1),
            "growth_mib": round(peak_rss_mib() - before, 1), "seconds": round(time.perf_counter() - start, 2)}


def video_main(args) -> list[dict]:
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        write_clip(clip)
        print(f"{'method':>16s} {'peak RSS MiB':>13s} {'growth MiB':>11s} {'seconds':>8s}")
        for method in ("decode-all", "load_video_frames"):
            command = [sys.executable, __file__, "--video_worker", method, "--clip", str(clip)] + (
                ["--repo", args.repo] if args.repo else [])
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{method:>16s} {row['peak_rss_mib']:13.1f} {row['growth_mib']:11.1f} {row['seconds']:8.2f}")
    return rows


def slope_mib_per_1k(rows: list[dict]) -> float:
    """Least-squares slope of peak RSS against N, in MiB per 1,000 inputs."""
    xs, ys = [r["n"] for r in rows], [r["peak_rss_mib"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=32)
    parser.add_argument("--source", choices=("generator", "list", "parquet"), default="generator",
                        help="parquet: text rows in a Parquet file through tte-flash encode --input ... --output DIR")
    parser.add_argument("--row_group_size", "--row-group-size", type=int, default=10_000,
                        help="--source parquet: rows per row group of the file")
    parser.add_argument("--max_words", "--max-words", type=int, default=119,
                        help="--source parquet: texts of 3 to this many words (fewer: a faster run)")
    parser.add_argument("--repo", default=None, help="import tte_flash from this checkout instead")
    parser.add_argument("--tag", default=None, help="a name for this run in the results file")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/encode-memory-...)")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--video", action="store_true", help="measure reading 8 frames of a video file (PyAV)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--video_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--clip", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parquet", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return 0
    if args.video_worker is not None:
        print(json.dumps(video_worker(args)))
        return 0
    if args.video:
        rows = video_main(args)
        import av
        return save(args, {"benchmark": "encode_memory_video", "clip": "30 s, 640x360, 30 fps, H.264", "rows": rows,
                           "pyav": av.__version__})
    if any(n < 1 for n in args.sizes) or len(args.sizes) < 2:
        parser.error("--sizes needs at least two positive sizes")
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"{'inputs':>8s} {'peak RSS MiB':>13s} {'warm-up MiB':>12s} {'growth MiB':>11s} {'inputs/s':>9s}"
          + (f" {'encode peak MiB':>16s}" if args.source == "parquet" else ""))
    import tempfile
    scratch = tempfile.TemporaryDirectory()
    for n in args.sizes:
        command = [sys.executable, __file__, "--worker", str(n), "--preset", args.preset, "--batch_size",
                   str(args.batch_size), "--source", args.source] + (["--repo", args.repo] if args.repo else [])
        if args.source == "parquet":  # written here, so the worker's peak holds only the reading of it
            path = Path(scratch.name) / f"corpus-{n}.parquet"
            write_parquet(path, n, args.row_group_size, max_words=args.max_words)
            command += ["--parquet", str(path)]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        Path(scratch.name, f"corpus-{n}.parquet").unlink(missing_ok=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{n:8d} {row['peak_rss_mib']:13.1f} {row['warmup_peak_rss_mib']:12.1f} {row['growth_mib']:11.1f} "
              f"{row['inputs_per_s']:9.1f}" + (f" {row['encode_peak_rss_mib'] or float('nan'):16.1f}"
                                               if args.source == "parquet" else ""))
    slope = slope_mib_per_1k(rows)
    spread = max(r["peak_rss_mib"] for r in rows) / min(r["peak_rss_mib"] for r in rows) - 1
    print(f"slope: {slope:.2f} MiB per 1k inputs; largest peak {100 * spread:.1f}% over the smallest "
          f"(target: flat within 10%)")
    encode_peaks = [r.get("encode_peak_rss_mib") for r in rows]
    encode_spread = max(encode_peaks) / min(encode_peaks) - 1 if None not in encode_peaks else None
    if encode_spread is not None:  # the peaks while encoding alone, after the warm-up's was reset
        print(f"peak while encoding: largest {100 * encode_spread:.1f}% over the smallest")
    scratch.cleanup()
    extra = {"row_group_size": args.row_group_size, "max_words": args.max_words, "encode_peak_spread":
             None if encode_spread is None else round(encode_spread, 4),
             "path": "tte-flash encode --input corpus.parquet --role document --output embs/ (in-process)"} \
        if args.source == "parquet" else {}
    return save(args, {"benchmark": "encode_memory", "preset": args.preset, "source": args.source, **extra,
                       "batch_size": args.batch_size, "rows": rows, "slope_mib_per_1k": round(slope, 3),
                       "peak_spread": round(spread, 4), "omp_threads": env["OMP_NUM_THREADS"],
                       "onednn_primitive_cache_capacity": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")})


def save(args, result: dict) -> int:
    """Write the result with the machine, versions and commit (unless --no-save)."""
    if args.no_save:
        return 0
    sys.path.insert(0, str(HERE))
    from _common import RESULTS, git_commit, versions
    result = {**result, "tag": args.tag, "repo": args.repo, "device": "cpu",
              "cpu": platform.processor() or platform.machine(), "versions": versions(), "commit": git_commit(),
              "date": datetime.date.today().isoformat()}
    kind = "encode-memory-video" if args.video else f"encode-memory-cpu-{args.preset}" + \
        ("-parquet" if args.source == "parquet" else "")
    name = f"{kind}{'-' + args.tag if args.tag else ''}-{result['date']}.json"
    path = Path(args.output) if args.output else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
