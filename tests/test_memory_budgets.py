"""Pixel budgets (issue 18, item 5): an image or a video over its budget is refused from its header, before
any pixel is decoded, with the file, its size and the budget named; large images within the budget are
decoded reduced."""
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from tte_flash import media
from tte_flash.media import MediaBudgetError, load_image, load_video_frames, pixel_budgets


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says width x height and whose pixel data is a few bytes: it opens (the header), but
    decoding it fails, so a test can tell a refusal from the header apart from a decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture
def no_decoding(monkeypatch):
    """Decoding any image file fails the test."""
    def refuse(self):
        raise AssertionError(f"decoded a {self.size} image")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.fixture(autouse=True)
def default_budgets(monkeypatch):
    monkeypatch.delenv("TTE_FLASH_MAX_IMAGE_PIXELS", raising=False)
    monkeypatch.delenv("TTE_FLASH_MAX_VIDEO_PIXELS", raising=False)


def test_a_12000_square_png_is_refused_from_its_header(tmp_path, no_decoding, tiny_model):
    """The audit's 140 KB PNG of 12000 x 12000: a path, bytes, and an encode all fail before decoding."""
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(12000, 12000))
    message = r"image .*huge.png is 12000x12000 = 144.0 megapixels, over the budget of 89.5 megapixels per image"
    with pytest.raises(MediaBudgetError, match=message):
        load_image(path)
    with pytest.raises(MediaBudgetError, match=r"image from \d+ bytes is 12000x12000"):
        load_image(path.read_bytes())
    with pytest.raises(ValueError, match="TTE_FLASH_MAX_IMAGE_PIXELS"):
        tiny_model.encode_document({"image": str(path)})


def test_a_video_of_eight_huge_frames_fails_fast(tmp_path, no_decoding, tiny_model):
    """The audit's folder of 8 PNGs of 12000 x 12000 as a video: a clear error in well under a second of work
    (no MemoryError), naming the folder and the frame."""
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(8):
        (folder / f"{i:03d}.png").write_bytes(png_header_only(12000, 12000))
    start = time.monotonic()
    with pytest.raises(MediaBudgetError, match=rf"video {folder} \(8 frames\): sampled frame 1 of 8 is 12000x12000"):
        load_video_frames(folder, max_frames=8)
    with pytest.raises(MediaBudgetError, match="clip"):
        tiny_model.encode_document({"video": str(folder)})
    assert time.monotonic() - start < 10


def test_the_video_budget_counts_the_sampled_frames_together(tmp_path, rng, monkeypatch):
    """Frames each within the image budget, over the video budget together: refused before any is decoded;
    only the sampled frames count; at the budget the video loads."""
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    sampled = 6 * 40 * 30  # max_frames=6 of the 10
    with pytest.raises(MediaBudgetError, match=r"its 6 sampled frames \(40x30\) are 0.0 megapixels together, over "
                                               r"the budget of 0.0 megapixels per video"):
        load_video_frames(folder, max_frames=6, max_video_pixels=sampled - 1)
    monkeypatch.setenv("TTE_FLASH_MAX_VIDEO_PIXELS", str(sampled - 1))
    with pytest.raises(MediaBudgetError, match="TTE_FLASH_MAX_VIDEO_PIXELS raises it"):
        load_video_frames(folder, max_frames=6)
    frames = [Image.open(folder / f"{i:03d}.png") for i in range(10)]
    with pytest.raises(MediaBudgetError, match="video of 10 frames"):  # a list of images counts the same way
        load_video_frames(frames, max_frames=6)
    monkeypatch.setenv("TTE_FLASH_MAX_VIDEO_PIXELS", str(sampled))
    assert len(load_video_frames(folder, max_frames=6)) == 6
    with pytest.raises(MediaBudgetError, match="sampled frame 1 of 6 is 40x30"):  # each frame: the image budget
        load_video_frames(folder, max_frames=6, max_pixels=40 * 30 - 1)


def test_budgets_from_arguments_and_environment(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    path.write_bytes(png_header_only(3000, 2000))
    with pytest.raises(MediaBudgetError, match=r"3000x2000 = 6.0 megapixels, over the budget of 5.0 megapixels"):
        load_image(path, max_pixels=5_000_000)
    monkeypatch.setenv("TTE_FLASH_MAX_IMAGE_PIXELS", "5e6")
    with pytest.raises(MediaBudgetError, match="over the budget of 5.0 megapixels"):
        load_image(path)
    # within the budget the image is decoded: this one's pixel data is cut short, a decode error (with a reason)
    with pytest.raises(ValueError, match=r"cannot read image .*wide.png: \S") as caught:
        load_image(path, max_pixels=6_000_000)
    assert not isinstance(caught.value, MediaBudgetError)
    monkeypatch.setenv("TTE_FLASH_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="TTE_FLASH_MAX_IMAGE_PIXELS='lots': expected a positive number"):
        pixel_budgets()


def test_over_pils_own_limit_is_a_budget_error(tmp_path, no_decoding):
    """PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS in Image.open, before our check: still a budget error."""
    path = tmp_path / "giant.png"
    path.write_bytes(png_header_only(20000, 20000))
    with pytest.raises(MediaBudgetError, match="giant.png: Image size .*PIL's Image.MAX_IMAGE_PIXELS"):
        load_image(path, max_pixels=10**9)


def test_large_images_are_decoded_reduced(tmp_path, rng, monkeypatch):
    """Over 4 x DECODE_MAX_PIXELS an image is reduced by the largest integer factor that keeps it over
    DECODE_MAX_PIXELS (PNG: reduced after decoding, palette images too; JPEG: decoded at 1/8 scale by the
    decoder); smaller images are returned as they are."""
    monkeypatch.setattr(media, "DECODE_MAX_PIXELS", 32 * 32)
    pixels = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    original = Image.fromarray(pixels)
    original.save(tmp_path / "big.png")
    reduced = load_image(tmp_path / "big.png")  # 60000 pixels: factor 7 -> 43 x 29 (reduce rounds up) >= 1024
    assert reduced.size == (43, 29) and np.array_equal(np.array(reduced), np.array(original.reduce(7)))
    original.quantize(16).save(tmp_path / "palette.png")
    assert load_image(tmp_path / "palette.png").size == (43, 29)
    Image.fromarray(rng.integers(0, 256, (384, 512, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=90)
    assert load_image(tmp_path / "big.jpg").size == (64, 48)  # the JPEG decoder's 1/8 scale (reduce alone: 40x30)
    small = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))  # 2000 pixels < 4 x 1024
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    assert np.array_equal(np.array(load_image(buffer.getvalue())), np.array(small))


def test_a_video_file_is_checked_from_its_metadata(tmp_path, monkeypatch):
    """A video file (torchcodec's decoder, faked here): the frame size from the metadata times the sampled
    frames is checked before any frame is decoded."""
    class FakeDecoder:
        class metadata:
            width, height = 7680, 4320  # 8K: 33.2 megapixels a frame

        def __init__(self, path):
            pass

        def __len__(self):
            return 900

        def get_frames_at(self, indices):
            raise AssertionError("decoded frames")
    monkeypatch.setattr(media, "_video_backend", lambda: FakeDecoder)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not really a video")
    with pytest.raises(MediaBudgetError, match=r"video .*clip.mp4: its 16 sampled frames \(7680x4320\) are 530.8 "
                                               r"megapixels together, over the budget of 268.4 megapixels"):
        load_video_frames(clip, max_frames=16)
