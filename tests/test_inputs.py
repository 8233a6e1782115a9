"""Input handling: every accepted input form, video, and clear errors for bad input."""
import json

import numpy as np
import pytest
import torch
from conftest import random_image

from tte_flash import TTEFlashModel
from tte_flash.processing import IMAGE, VIDEO, normalize_input


def test_input_forms_agree(tiny_model, rng, tmp_path):
    image = random_image(rng)
    path = tmp_path / "photo.png"
    image.save(path)
    from_pil = tiny_model.encode_document(image)
    np.testing.assert_allclose(tiny_model.encode_document(str(path)), from_pil, atol=1e-6)
    np.testing.assert_allclose(tiny_model.encode_document(path), from_pil, atol=1e-6)
    np.testing.assert_allclose(tiny_model.encode_document({"image": str(path)}), from_pil, atol=1e-6)
    # a sentence that happens to end in ".png" is text, not a path
    assert normalize_input("the file is named photo.png") == {"text": "the file is named photo.png"}


def test_more_image_forms_agree(tiny_model, rng, tmp_path, monkeypatch):
    """A path with a space, encoded bytes, numpy (HWC) and torch (CHW) arrays, and a URL (its fetch stubbed
    offline) all embed like the PIL image; a pathlib.Path is always a path."""
    import io
    image = random_image(rng)
    spaced = tmp_path / "my photo.png"
    image.save(spaced)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    hwc = np.array(image)
    from_pil = tiny_model.encode_document(image)
    monkeypatch.setattr("tte_flash.media.fetch_url", lambda url: buffer.getvalue() if url.endswith("/x.png") else b"")
    forms = {"path with a space": str(spaced), "bytes": buffer.getvalue(), "numpy HWC uint8": hwc,
             "torch CHW float": torch.from_numpy(hwc).permute(2, 0, 1).float() / 255,
             "url": "https://example.com/x.png", "dict with bytes": {"image": buffer.getvalue()}}
    for name, form in forms.items():
        np.testing.assert_allclose(tiny_model.encode_document(form), from_pil, atol=1e-5, err_msg=name)
    assert normalize_input("not a file.png") == {"text": "not a file.png"}  # spaces and no such file: text
    assert normalize_input(tmp_path / "clip.mp4") == {"video": tmp_path / "clip.mp4"}
    with pytest.raises(ValueError, match="neither a folder of frames nor a file with an image"):
        normalize_input(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="pass a list for several images"):
        tiny_model.encode_document(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="cannot read image from 3 bytes"):
        tiny_model.encode_document(b"abc")


def test_instruction_and_image_placeholder_layout(tiny_model, rng):
    image = random_image(rng)
    record = tiny_model.processor({"instruction": "Find it", "text": "left <|image_1|> right", "image": image})
    text = tiny_model.processor.tokenizer.decode(record.input_ids)
    assert text.startswith("Find it\nleft <|vision_start|><|image_pad|>")
    assert text.endswith("<|vision_end|> right")
    assert (record.mm_types == IMAGE).sum() == int(record.image_grid_thw.prod()) // 4
    # without a placeholder the image goes first, after the instruction
    first = tiny_model.processor({"text": "caption", "image": image})
    assert tiny_model.processor.tokenizer.decode(first.input_ids).startswith("<|vision_start|>")


def test_video_from_frame_folder_and_frame_list(tiny_model, rng, tmp_path):
    frames = [random_image(rng, 56, 84) for _ in range(5)]
    for i, frame in enumerate(frames):
        frame.save(tmp_path / f"frame_{i:03d}.png")
    from_dir = tiny_model.encode_document({"video": str(tmp_path)})
    from_list = tiny_model.encode_document({"video": frames})
    np.testing.assert_allclose(from_dir, from_list, atol=1e-6)
    record = tiny_model.processor({"video": frames, "text": "what happens"})
    t, h, w = record.video_grid_thw[0].tolist()
    assert t == 3  # 5 frames padded to 6, two frames per temporal patch
    assert (record.mm_types == VIDEO).sum() == t * h * w // 4
    # positions: video tokens take (t, h, w) grid indices, text resumes after max(t, h/2, w/2)
    video_pos = record.positions[:, record.mm_types == VIDEO]
    assert video_pos[0].max() - video_pos[0].min() == t - 1
    assert record.next_position == max(t, h // 2, w // 2) + (record.mm_types == 0).sum()  # text: 1 pos each


def test_video_of_a_still_frame_equals_image_pixels(tiny_model, rng):
    """Qwen2-VL treats an image as two identical frames: a 2-frame still video has the same patches."""
    frame = random_image(rng, 56, 84)
    video = tiny_model.processor({"video": [frame, frame]})
    image = tiny_model.processor({"image": frame})
    torch.testing.assert_close(video.pixel_values_videos, image.pixel_values)
    assert video.video_grid_thw.tolist() == image.image_grid_thw.tolist()


def test_missing_image_names_the_path(tiny_model, tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        tiny_model.encode_query(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        tiny_model.encode_query({"text": "q", "image": missing})


def test_unreadable_image_names_the_path(tiny_model, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png"):
        tiny_model.encode_document({"image": str(bad)})


def test_missing_video_names_the_path(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="clip.mp4"):
        tiny_model.encode_document(str(tmp_path / "clip.mp4"))


@pytest.mark.parametrize("bad", ["", "   ", {"text": ""}, {"instruction": "only an instruction"}])
def test_empty_input_is_rejected(tiny_model, bad):
    with pytest.raises(ValueError, match="empty input"):
        tiny_model.encode_query(["ok", bad])


def test_unknown_keys_and_types_are_rejected(tiny_model):
    with pytest.raises(ValueError, match="unknown keys"):
        tiny_model.encode_query({"txt": "typo"})
    with pytest.raises(ValueError, match="expected a str"):
        tiny_model.encode_query([3.14])


@pytest.mark.parametrize("think_tokens", [33, -1, 2.5, True])
def test_think_tokens_out_of_range(tiny_model, think_tokens):
    with pytest.raises(ValueError, match="think_tokens"):
        tiny_model.encode_query("q", think_tokens=think_tokens)
    with pytest.raises(ValueError, match="think_tokens"):
        tiny_model.generate_cot("q", think_tokens=think_tokens)


def test_unknown_preset_and_mode(tiny_model):
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        TTEFlashModel.from_preset("huge")
    with pytest.raises(ValueError, match="unknown mode"):
        tiny_model.encode_query("q", mode="fast")


def test_bad_config_values(fresh_tiny):
    with pytest.raises(ValueError, match="default_think_tokens"):
        fresh_tiny(max_think_tokens=4, default_think_tokens=8)
    with pytest.raises(ValueError, match="embedding_layer"):
        fresh_tiny(embedding_layer=-5)


def test_checkpoint_of_another_model_type(tiny_model, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' checkpoint, not a TTE-Flash"):
        TTEFlashModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs a Qwen2-VL"):
        TTEFlashModel.from_backbone(tmp_path)
    qwen_dir = tmp_path / "qwen"
    qwen_dir.mkdir()
    (qwen_dir / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match="from_backbone"):
        TTEFlashModel.from_pretrained(qwen_dir)


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        TTEFlashModel.from_pretrained(tmp_path / "does" / "not" / "exist")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        TTEFlashModel.from_backbone("./missing-dir")
    with pytest.raises(FileNotFoundError, match="checkpoint not found: runs/tiny"):
        TTEFlashModel.from_pretrained("runs/tiny")  # relative dir or Hub id: neither exists (offline)


def test_similarity_rejects_mismatched_sizes(tiny_model):
    with pytest.raises(ValueError, match="embedding sizes differ"):
        tiny_model.similarity(np.zeros((2, 64)), np.zeros((3, 32)))


def test_long_inputs_are_truncated_with_a_warning(tiny_model, rng):
    """Text beyond max_query_tokens is cut from the end (the image is kept whole) with a warning; the
    truncated input embeds like the input cut by hand; an image alone over the limit is a clear error."""
    processor = tiny_model.processor
    image = random_image(rng, 56, 56)
    limit = processor({"image": image, "text": "x"}).input_ids.numel() + 5
    long_text = " ".join(["word"] * 400)
    tiny_model.config.max_query_tokens = limit
    try:
        with pytest.warns(UserWarning, match=f"max_query_tokens={limit}"):
            record = processor({"image": image, "text": long_text})
        assert record.input_ids.numel() == limit
        cut = processor.tokenizer.decode(record.input_ids[-(limit - processor({"image": image}).input_ids.numel()):])
        with pytest.warns(UserWarning):
            truncated = tiny_model.encode_query({"image": image, "text": long_text}, think_tokens=4)
        np.testing.assert_allclose(truncated, tiny_model.encode_query({"image": image, "text": cut}, think_tokens=4),
                                   atol=1e-5)
        tiny_model.config.max_query_tokens = 3
        with pytest.raises(ValueError, match="image/video blocks alone are"):
            processor({"image": image, "text": "x"})
    finally:
        tiny_model.config.max_query_tokens = None
    default = tiny_model.config.text_config.max_position_embeddings - tiny_model.config.max_think_tokens - 1
    assert processor.max_query_tokens == default
