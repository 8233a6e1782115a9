import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub; offline lookups fail fast

import torch  # noqa: E402  (torch alone does not import triton)

if not torch.cuda.is_available():
    # The Triton kernels run under the interpreter on CPU machines. The variable must be set before any
    # @triton.jit function is decorated, and any test module may import tte_flash.kernels first
    # (DESIGN.md §8), so it is set here, before collection, rather than in test_kernel.py.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_script(relative: str, name: str):
    """A repository script (e.g. ``training/pretrain.py``, not a package module) imported as module ``name``."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
