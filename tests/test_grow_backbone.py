"""training/grow_backbone.py: a deeper backbone that computes exactly what its source computes."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from grow_backbone import ZEROED, grow  # noqa: E402

from conftest import random_image  # noqa: E402
from tte_flash import TTEFlashModel  # noqa: E402


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    return grow("tiny-instruct", str(tmp_path_factory.mktemp("grown")), 8)


def test_grown_backbone_embeds_and_generates_as_its_source(grown):
    source = TTEFlashModel.from_preset("tiny-instruct").eval()
    deeper = TTEFlashModel.from_backbone(grown).eval()
    assert deeper.config.text_config.num_hidden_layers == 2 * source.config.text_config.num_hidden_layers
    rng = np.random.default_rng(0)
    inputs = [{"image": random_image(rng, 56, 84), "text": "What colour is the cell in row 1, column 2?"},
              "Ann's hat is red. Q: What colour is Ann's hat?"]
    with torch.no_grad():
        a = source.encode_query(inputs, think_tokens=0)
        b = deeper.encode_query(inputs, think_tokens=0)
    torch.testing.assert_close(torch.as_tensor(b), torch.as_tensor(a), atol=1e-5, rtol=1e-5)
    assert source.generate_traces(inputs[1:], max_new_tokens=12) == deeper.generate_traces(inputs[1:], max_new_tokens=12)


def test_new_layers_write_nothing_until_trained(grown):
    from safetensors.torch import load_file
    state = load_file(Path(grown) / "model.safetensors")
    for i in range(8):
        for name in ZEROED:
            weight = next(v for k, v in state.items() if k.endswith(f"layers.{i}.{name}"))
            assert (weight.abs().sum() == 0) == (i % 2 == 1), (i, name)


def test_depth_must_be_a_multiple(tmp_path):
    with pytest.raises(ValueError, match="multiple of the source's 4 layers"):
        grow("tiny-instruct", str(tmp_path / "x"), 6)
    with pytest.raises(FileNotFoundError, match="neither a backbone folder nor a preset"):
        grow("no-such-preset", str(tmp_path / "y"), 8)
