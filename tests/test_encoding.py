"""Encoding at scale: streaming, token-budget batches, max_length, video frame sampling, shards with resume.

References are independent of tte_flash.encoding: a plain per-input loop over the processor, collate and
tte_forward; a brute-force check of the batch plan; decode-everything-then-sample for videos."""
import io
import json
import sys
import types
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_image
from PIL import Image

import tte_flash.encoding as encoding
from tte_flash.cli import main as cli_main
from tte_flash.encoding import plan_batches, read_shards
from tte_flash.media import load_video_frames
from tte_flash.processing import collate


def per_input_reference(model, items, think_tokens, limit=None):
    """One input at a time, straight through processor -> collate -> tte_forward (no batching, no sorting)."""
    out = []
    with torch.inference_mode():
        for i, item in enumerate(items):
            record = model.processor(item, i, limit)
            batch = collate([record], model.processor.think_token_ids, model.processor.emb_token_id,
                            think_tokens=think_tokens, pad_id=model.processor.tokenizer.pad_token_id)
            out.append(model.tte_forward(batch).embeddings[0].float())
    return F.normalize(torch.stack(out), dim=-1).numpy()


def mixed_inputs(rng, n):
    """Fresh random inputs of very different lengths: texts, images of random sizes, instructions, placeholders."""
    items = []
    for i in range(n):
        words = " ".join(f"w{int(x)}" for x in rng.integers(0, 99, int(rng.integers(1, 60))))
        kind = i % 4
        if kind == 0:
            items.append(words)
        elif kind == 1:
            items.append({"image": random_image(rng)})
        elif kind == 2:
            items.append({"instruction": "Find it.", "text": f"left <|image_1|> {words}", "image": random_image(rng)})
        else:
            items.append({"text": words, "instruction": "Retrieve."})
    return items


@pytest.fixture
def small_windows(monkeypatch):
    """Windows of 5 inputs, so that a short test crosses many window boundaries."""
    monkeypatch.setattr(encoding, "MIN_WINDOW", 5)
    monkeypatch.setattr(encoding, "WINDOW_BATCHES", 1)


@pytest.mark.parametrize("packed", [False, True])
def test_streamed_encode_equals_per_input_loop(tiny_model, rng, small_windows, packed):
    items = mixed_inputs(rng, 23)
    reference = per_input_reference(tiny_model, items, think_tokens=3)
    streamed = tiny_model.encode_query((x for x in items), think_tokens=3, batch_size=4, max_batch_tokens=300,
                                       packed=packed)
    assert streamed.shape == reference.shape
    np.testing.assert_allclose(streamed, reference, atol=1e-6)
    # a list, one window, no token limit: the same vectors in the same order
    np.testing.assert_allclose(tiny_model.encode_query(items, think_tokens=3, max_batch_tokens=None), reference,
                               atol=1e-6)


def test_generator_is_read_lazily(tiny_model, small_windows, monkeypatch):
    """The first forward pass runs after one window has been read, not the whole input."""
    pulled, seen_at_first_batch = [0], []
    original = tiny_model._encode_batch

    def spy(*args, **kwargs):
        seen_at_first_batch.append(pulled[0])
        return original(*args, **kwargs)

    def source():
        for i in range(40):
            pulled[0] += 1
            yield f"input number {i}"
    monkeypatch.setattr(tiny_model, "_encode_batch", spy)
    out = tiny_model.encode_document(source(), batch_size=2)
    assert out.shape == (40, 64) and pulled[0] == 40
    assert seen_at_first_batch[0] <= 5  # one window


def test_plan_batches_respects_limits_and_is_greedy(rng):
    for _ in range(200):
        lengths = [int(x) for x in rng.integers(1, 400, int(rng.integers(1, 40)))]
        batch_size, budget, packed = int(rng.integers(1, 9)), int(rng.integers(50, 1200)), bool(rng.integers(2))
        batches = plan_batches(lengths, batch_size, budget, packed)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(lengths, reverse=True)  # longest first
        cost = (lambda ls: sum(ls)) if packed else (lambda ls: max(ls) * len(ls))
        for b, nxt in zip(batches, batches[1:] + [None]):
            members = [lengths[i] for i in b]
            assert len(b) <= batch_size
            assert len(b) == 1 or cost(members) <= budget
            if nxt is not None:  # greedy: the next input would not have fitted
                assert len(b) == batch_size or cost(members + [lengths[nxt[0]]]) > budget
    assert plan_batches([5, 5, 5], 2, None, False) == [[0, 1], [2]]  # no token limit: batch_size only


def test_length_estimate_is_exact(tiny_model, rng, tmp_path):
    """The cheap estimate (no pixels decoded) equals the processor's real length, truncation included."""
    processor = tiny_model.processor
    image = random_image(rng, 77, 201)
    image.save(tmp_path / "a.png")
    buffer = io.BytesIO()
    random_image(rng, 40, 300).save(buffer, format="PNG")
    frames = [random_image(rng, 60, 90) for _ in range(5)]
    for i, frame in enumerate(frames):
        frame.save(tmp_path / f"f{i}.png")
    items = mixed_inputs(rng, 12) + [
        str(tmp_path / "a.png"), {"image": buffer.getvalue(), "text": "bytes"},
        {"image": np.array(random_image(rng, 300, 20))}, {"video": frames, "text": "clip"},
        {"video": str(tmp_path), "instruction": "Watch."}, {"video": frames[:1] * 11}]
    for i, item in enumerate(items):
        assert processor.estimate_length(item, i) == processor(item, i).input_ids.numel(), item
    # a URL is not fetched to estimate: it counts as the largest image the pixel budget allows
    largest = processor({"image": random_image(rng, 224, 224)}).input_ids.numel()
    assert processor.estimate_length("https://example.com/x.png") == largest
    long_text = {"image": image, "text": " ".join(["word"] * 300)}
    with pytest.warns(UserWarning, match="max_query_tokens=120"):
        assert processor.estimate_length(long_text, 0, 120) == processor(long_text, 0, 120).input_ids.numel() == 120


def test_max_length_truncates_text_and_keeps_think_and_emb(tiny_model, rng):
    k, kept = 4, 9
    text = " ".join(f"w{int(x)}" for x in rng.integers(0, 99, 80))
    ids = tiny_model.processor.tokenizer(text, add_special_tokens=False).input_ids
    cut_by_hand = tiny_model.processor.tokenizer.decode(ids[:kept])
    with pytest.warns(UserWarning, match="truncated"):
        truncated = tiny_model.encode_query([text, "short"], think_tokens=k, max_length=kept + k + 1)
    np.testing.assert_allclose(truncated, per_input_reference(tiny_model, [cut_by_hand, "short"], k), atol=1e-6)
    with pytest.raises(ValueError, match="max_length=5 leaves no room"):
        tiny_model.encode_query(text, think_tokens=k, max_length=5)


def test_datasets_and_iterables(tiny_model, rng):
    datasets = pytest.importorskip("datasets")
    texts = [f"caption {i} " + "x" * int(rng.integers(0, 30)) for i in range(9)]
    images = [random_image(rng) for _ in range(9)]
    expected = tiny_model.encode_document([{"text": t, "image": im} for t, im in zip(texts, images)])
    table = datasets.Dataset.from_dict({"id": list(range(9)), "text": texts, "image": images})
    table = table.cast_column("image", datasets.Image())
    np.testing.assert_allclose(tiny_model.encode_document(table), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"input 0: unknown keys \['id'\]"):  # raw rows keep every column
        tiny_model.encode_document(iter(table))
    with pytest.raises(ValueError, match="no text, image or video column"):
        tiny_model.encode_document(datasets.Dataset.from_dict({"caption": texts}))
    assert tiny_model.encode_document([]).shape == (0, 64)


@pytest.mark.parametrize("kwargs, message", [({"batch_size": 0}, "batch_size must be a positive int"),
                                             ({"max_batch_tokens": 0}, "max_batch_tokens must be"),
                                             ({"max_length": 2.5}, "max_length must be")])
def test_bad_encode_options(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.encode_document(["a"], **kwargs)


def test_bad_input_in_a_stream_names_its_index(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="input 6: expected a str"):
        tiny_model.encode_document(x for x in ["a"] * 6 + [42])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        tiny_model.encode_document(["a", {"text": "b", "image": str(tmp_path / "gone.png")}])
    with pytest.raises(ValueError, match="inputs must be one input or a list"):
        tiny_model.encode_document(42)


# ------------------------------------------------------------------------------------------- video


class FakeFrame:
    converted = 0

    def __init__(self, index, pts):
        self.index, self.pts = index, pts

    def to_image(self):
        FakeFrame.converted += 1
        return frame_image(self.index)


def frame_image(index):
    return Image.new("RGB", (56, 84), (index % 256, index // 256, 200))  # the index, readable back


class FakeContainer:
    """A PyAV container: keyframes every 6 frames, 25 fps, time base 1/12800, packets in decode order
    (display order with each B-frame pair swapped); counts decoded frames."""

    def __init__(self, n_frames, timestamps=True):
        self.n, self.position, self.decoded, self.timestamps = n_frames, 0, 0, timestamps
        rate, base = Fraction(25), Fraction(1, 12800)
        self.pts_step = int(1 / (rate * base))
        codec = types.SimpleNamespace(height=84, width=56)
        stream = types.SimpleNamespace(frames=0, average_rate=rate, time_base=base, start_time=0, codec_context=codec)
        self.streams = types.SimpleNamespace(video=[stream])

    def demux(self, stream=None):
        order = [j for i in range(0, self.n - 1, 2) for j in (i + 1, i)] + ([self.n - 1] if self.n % 2 else [])
        for i in order:
            yield types.SimpleNamespace(pts=i * self.pts_step if self.timestamps else None, size=100)
        yield types.SimpleNamespace(pts=None, size=0)  # the flush packet

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def seek(self, offset, stream=None, backward=True, any_frame=False):
        frame = min(offset // self.pts_step, self.n - 1)
        self.position = frame - frame % 6  # the keyframe at or before

    def decode(self, stream=None, video=None):
        while self.position < self.n:
            self.decoded += 1
            self.position += 1
            yield FakeFrame(self.position - 1, (self.position - 1) * self.pts_step)


def sample_all_then_pick(n, max_frames):
    """The old rule, written out: decode every frame, then take frame int(i * n / max_frames)."""
    frames = list(range(n))
    if n > max_frames:
        frames = [frames[int(i * n / max_frames)] for i in range(max_frames)]
    return frames


@pytest.fixture
def fake_av(monkeypatch):
    containers = []
    settings = {"timestamps": True, "n": 100}

    def open_(path):
        containers.append(FakeContainer(settings["n"], settings["timestamps"]))
        return containers[-1]
    monkeypatch.setitem(sys.modules, "torchcodec", None)  # PyAV path even where torchcodec is installed
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    monkeypatch.setitem(sys.modules, "av", types.SimpleNamespace(open=open_))
    FakeFrame.converted = 0
    return containers, settings


@pytest.mark.parametrize("n_frames", [100, 9, 7])
def test_pyav_seeks_and_decodes_only_sampled_frames(fake_av, tmp_path, n_frames):
    containers, settings = fake_av
    settings["n"] = n_frames
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    frames = load_video_frames(clip, max_frames=8)
    expected = sample_all_then_pick(n_frames, 8)
    expected += expected[-1:] * (len(expected) % 2)
    assert [np.array(f).tolist() for f in frames] == [np.array(frame_image(i)).tolist() for i in expected]
    assert FakeFrame.converted == len(set(expected))  # only the frames used are converted
    if n_frames == 100:
        assert containers[-1].decoded <= 8 * 6  # at most a keyframe interval per sampled frame, not all 100


def test_pyav_without_timestamps_keeps_memory_bounded(fake_av, tmp_path):
    containers, settings = fake_av
    settings.update(n=1000, timestamps=False)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    frames = load_video_frames(clip, max_frames=8)
    indices = [int(np.array(f)[0, 0, 0]) + 256 * int(np.array(f)[0, 0, 1]) for f in frames]
    assert len(frames) == 8 and FakeFrame.converted == 8 and containers[-1].decoded == 1000
    assert indices[0] == 0 and indices == sorted(set(indices))
    assert max(np.diff(indices)) <= 2 * min(np.diff(indices))  # spread over the clip: 1000 frames / 8
    assert indices[-1] >= 750


@pytest.mark.parametrize("name, codec, n_frames", [("a.mp4", "libx264", 97), ("b.webm", "libvpx-vp9", 61),
                                                   ("c.mkv", "mpeg4", 50)])
def test_real_pyav_seeking_equals_decoding_everything(tmp_path, name, codec, n_frames):
    """With PyAV installed (the `video` extra; skipped otherwise): a written clip, B-frames and containers
    that do not state their frame count included, gives exactly the frames of decode-all-then-sample."""
    av = pytest.importorskip("av")
    path = tmp_path / name
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(n_frames):
            pixels = np.zeros((64, 96, 3), np.uint8)
            pixels[..., 0], pixels[:8, :i % 96 + 1, 2] = i * 4 % 256, 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        everything = [frame.to_image() for frame in container.decode(video=0)]
    expected = [np.asarray(everything[i]) for i in sample_all_then_pick(len(everything), 8)]
    assert [np.asarray(f).tolist() for f in load_video_frames(path, 8)] == [e.tolist() for e in expected]


def test_torchcodec_decodes_exactly_the_sampled_indices(monkeypatch, tmp_path):
    requested = []

    class VideoDecoder:
        def __init__(self, path):
            self.metadata = types.SimpleNamespace(num_frames=50, height=84, width=56)

        def __len__(self):
            return 50

        def get_frames_at(self, indices):
            requested.append(list(indices))
            data = torch.stack([torch.from_numpy(np.array(frame_image(i))).permute(2, 0, 1) for i in indices])
            return types.SimpleNamespace(data=data)
    monkeypatch.setitem(sys.modules, "torchcodec", types.ModuleType("torchcodec"))
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", types.SimpleNamespace(VideoDecoder=VideoDecoder))
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    frames = load_video_frames(clip, max_frames=8)
    assert requested == [sample_all_then_pick(50, 8)]
    assert [np.array(f).tolist() for f in frames] == [np.array(frame_image(i)).tolist() for i in requested[0]]


def test_video_file_embeds_like_its_sampled_frames(tiny_model, fake_av, tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    from_file = tiny_model.encode_document({"video": clip, "text": "a clip"})
    by_hand = [frame_image(i) for i in sample_all_then_pick(100, tiny_model.config.video_max_frames)]
    np.testing.assert_allclose(from_file, tiny_model.encode_document({"video": by_hand, "text": "a clip"}), atol=1e-6)
    item = {"video": clip}
    assert tiny_model.processor.estimate_length(item) == tiny_model.processor(item).input_ids.numel()


# ------------------------------------------------------------------------------------------- shards


def test_shards_equal_encode_and_resume_redoes_only_missing(tiny_model, rng, tmp_path):
    items = [f"document {i} " + "y" * int(rng.integers(0, 40)) for i in range(23)]
    expected = tiny_model.encode_document(items)
    out = tmp_path / "embs"
    result = tiny_model.encode_to_shards(iter(items), out, role="document", shard_size=5)
    assert (result["total"], result["num_shards"], result["encoded_now"]) == (23, 5, 23)
    np.testing.assert_allclose(read_shards(out), expected, atol=1e-6)
    # a crash mid-write: shard 1's sidecar never written, shard 3's array cut short, a stray temp file
    (out / "shard-00001.json").unlink()
    (out / "shard-00003.npy").write_bytes((out / "shard-00003.npy").read_bytes()[:100])
    (out / "shard-00004.npy.tmp-123").write_bytes(b"partial")
    with pytest.raises(ValueError, match=r"incomplete: shards \[1, 3\]"):
        read_shards(out)
    again = tiny_model.encode_to_shards(items, out, role="document", shard_size=5)
    assert again["encoded_now"] == 10
    np.testing.assert_allclose(read_shards(out), expected, atol=1e-6)


def test_shards_refuse_changed_inputs_or_settings(tiny_model, fresh_tiny, tmp_path):
    out = tmp_path / "embs"
    tiny_model.encode_to_shards([f"d{i}" for i in range(7)], out, role="document", shard_size=3)
    with pytest.raises(ValueError, match="shard 0 was made from other inputs"):
        tiny_model.encode_to_shards(["changed"] + [f"d{i}" for i in range(1, 7)], out, role="document", shard_size=3)
    with pytest.raises(ValueError, match="other settings \\(think_tokens: 0 there, 2 now\\)"):
        tiny_model.encode_to_shards([f"d{i}" for i in range(7)], out, role="document", shard_size=3, think_tokens=2)
    with pytest.raises(ValueError, match="other settings \\(weights: "):  # another checkpoint: never mixed in
        fresh_tiny().encode_to_shards([f"d{i}" for i in range(7)], out, role="document", shard_size=3)
    result = tiny_model.encode_to_shards(["x", "y"], out, role="document", shard_size=3, overwrite=True)
    assert result["total"] == 2 and read_shards(out).shape == (2, 64)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an embeddings directory"):
        tiny_model.encode_to_shards(["a"], tmp_path / "busy")
    with pytest.raises(ValueError, match="nothing to encode"):
        tiny_model.encode_to_shards([], tmp_path / "empty")
    assert not (tmp_path / "empty").exists()  # nothing left behind
    (tmp_path / "a.jsonl").write_text("x\n")
    with pytest.raises(ValueError, match="is a file"):
        tiny_model.encode_to_shards(["a"], tmp_path / "a.jsonl")
    (out / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a manifest tte-flash wrote"):
        read_shards(out)
    bad = [f"d{i}" for i in range(7)] + [{"text": "x", "imag": "y.png"}]  # input 7 sits in shard 2 (at 1 there)
    with pytest.raises(ValueError, match=r"^input 7: unknown keys \['imag'\]"):
        tiny_model.encode_to_shards(bad, tmp_path / "bad", role="document", shard_size=3)


def test_parts_fill_one_directory(tiny_model, tmp_path):
    items = [f"query {i}" for i in range(11)]
    out = tmp_path / "embs"
    first = tiny_model.encode_to_shards(items, out, shard_size=2, part=(0, 2), think_tokens=2)
    assert first["encoded_now"] == 6  # shards 0, 2, 4 (2 + 2 + 2)
    with pytest.raises(ValueError, match="incomplete"):
        read_shards(out)
    second = tiny_model.encode_to_shards(items, out, shard_size=2, part=(1, 2), think_tokens=2)
    assert second["encoded_now"] == 5
    np.testing.assert_allclose(read_shards(out), tiny_model.encode_query(items, think_tokens=2), atol=1e-6)


def test_cli_encode_resumes_after_a_bad_line(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"passage {i}"}) for i in range(12)]
    corpus.write_text("\n".join(lines[:7] + ["{not json"] + lines[8:]) + "\n")
    args = ["encode", "--input", str(corpus), "--model", "tiny-instruct", "--role", "document",
            "--output", str(tmp_path / "embs"), "--shard_size", "3"]
    assert cli_main(args) == 2
    assert f"{corpus}:8: not JSON" in capsys.readouterr().err
    assert len(list((tmp_path / "embs").glob("shard-*.json"))) == 2  # inputs 0-5 kept
    corpus.write_text("\n".join(lines) + "\n")
    assert cli_main(args) == 0
    assert "6 encoded by this run" in capsys.readouterr().out
    assert cli_main(["encode", "--input", str(corpus), "--model", "tiny-instruct", "--role", "document",
                     "--output", str(tmp_path / "all.npy")]) == 0
    np.testing.assert_allclose(read_shards(tmp_path / "embs"), np.load(tmp_path / "all.npy"), atol=1e-6)
    assert cli_main(["encode", "--input", str(tmp_path / "missing.jsonl"), "--model", "tiny-instruct"]) == 2
    assert "input file not found" in capsys.readouterr().err


def test_cli_devices_runs_one_part_per_device(tmp_path, monkeypatch, capsys):
    """--devices starts `python -m tte_flash encode ... --part i/N --device d` per device (run in-process here)."""
    import subprocess

    import tte_flash.cli as cli
    launched = []

    class InProcess:
        def __init__(self, command):
            assert command[1:3] == ["-m", "tte_flash"]
            launched.append(command[3:])
            self.code = cli.main(command[3:])

        def wait(self):
            return self.code
    monkeypatch.setattr(subprocess, "Popen", InProcess)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(f"query {i}") + "\n" for i in range(7)))
    common = ["--input", str(corpus), "--model", "tiny-instruct", "--think_tokens", "2", "--max_length", "40"]
    assert cli.main(["encode", *common, "--output", str(tmp_path / "embs"), "--shard_size", "2",
                     "--devices", "cpu,cpu"]) == 0
    assert [c[-4:] for c in launched] == [["--part", "0/2", "--device", "cpu"], ["--part", "1/2", "--device", "cpu"]]
    assert cli.main(["encode", *common, "--output", str(tmp_path / "all.npy")]) == 0
    np.testing.assert_allclose(read_shards(tmp_path / "embs"), np.load(tmp_path / "all.npy"), atol=1e-6)
    assert cli.main(["encode", *common, "--output", str(tmp_path / "x.npy"), "--devices", "cpu,cpu"]) == 2
    assert "--devices needs a shard directory" in capsys.readouterr().err
    before = (tmp_path / "all.npy").read_bytes()
    assert cli.main(["encode", *common, "--think_tokens", "0", "--output", str(tmp_path / "all.npy")]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "all.npy").read_bytes() == before


def test_cli_encode_reads_parquet_columns(tmp_path, rng):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    texts = [f"row {i} " + "z" * int(rng.integers(0, 20)) for i in range(6)]
    pq.write_table(pa.table({"id": list(range(6)), "text": texts}), tmp_path / "corpus.parquet")
    assert cli_main(["encode", "--input", str(tmp_path / "corpus.parquet"), "--model", "tiny-instruct",
                     "--output", str(tmp_path / "p.npy"), "--think_tokens", "2"]) == 0
    from tte_flash import TTEFlashModel
    expected = TTEFlashModel.from_preset("tiny-instruct").encode_query(texts, think_tokens=2)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, atol=1e-6)
