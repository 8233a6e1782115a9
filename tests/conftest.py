import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub; offline lookups fail fast

import numpy as np  # noqa: E402
import pytest
import torch
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model():
    """A shared tiny model (random init). Tests must not modify it; use `fresh_tiny` for that."""
    from tte_flash import TTEFlashModel
    torch.manual_seed(0)
    return TTEFlashModel.from_preset("tiny").eval()


@pytest.fixture
def fresh_tiny():
    from tte_flash import TTEFlashModel

    def make(**overrides):
        torch.manual_seed(1)
        return TTEFlashModel.from_preset("tiny", **overrides).eval()
    return make


def random_image(rng: np.random.Generator, height=None, width=None) -> Image.Image:
    height = height or int(rng.integers(30, 140))
    width = width or int(rng.integers(30, 140))
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % 2**32)
