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

``--video`` (needs PyAV) measures a video file instead: a 30 s 640x360 30 fps H.264 clip, peak RSS of
``load_video_frames`` (8 sampled frames, seeking) against decoding every frame and then sampling.

    python benchmarks/encode_memory.py                       # 1k, 3k, 10k; writes benchmarks/results/
    python benchmarks/encode_memory.py --video --no-save     # the video clip
    python benchmarks/encode_memory.py --sizes 1000 3000 10000 100000 --no-save
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


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args) -> dict:
    """Runs in its own process: one corpus size, one peak."""
    if args.repo:
        sys.path.insert(0, str(Path(args.repo).resolve()))
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
    parser.add_argument("--source", choices=("generator", "list"), default="generator")
    parser.add_argument("--repo", default=None, help="import tte_flash from this checkout instead")
    parser.add_argument("--tag", default=None, help="a name for this run in the results file")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/encode-memory-...)")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--video", action="store_true", help="measure reading 8 frames of a video file (PyAV)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--video_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--clip", default=None, help=argparse.SUPPRESS)
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
    print(f"{'inputs':>8s} {'peak RSS MiB':>13s} {'warm-up MiB':>12s} {'growth MiB':>11s} {'inputs/s':>9s}")
    for n in args.sizes:
        command = [sys.executable, __file__, "--worker", str(n), "--preset", args.preset, "--batch_size",
                   str(args.batch_size), "--source", args.source] + (["--repo", args.repo] if args.repo else [])
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{n:8d} {row['peak_rss_mib']:13.1f} {row['warmup_peak_rss_mib']:12.1f} {row['growth_mib']:11.1f} "
              f"{row['inputs_per_s']:9.1f}")
    slope = slope_mib_per_1k(rows)
    spread = max(r["peak_rss_mib"] for r in rows) / min(r["peak_rss_mib"] for r in rows) - 1
    print(f"slope: {slope:.2f} MiB per 1k inputs; largest peak {100 * spread:.1f}% over the smallest "
          f"(target: flat within 10%)")
    return save(args, {"benchmark": "encode_memory", "preset": args.preset, "source": args.source,
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
    kind = "encode-memory-video" if args.video else f"encode-memory-cpu-{args.preset}"
    name = f"{kind}{'-' + args.tag if args.tag else ''}-{result['date']}.json"
    path = Path(args.output) if args.output else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
