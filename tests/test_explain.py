"""explain(): logit-lens readings, decoded CoT, attention heatmaps over the image."""
import torch
from conftest import random_image
from PIL import Image

from tte_flash.attention import reference_attention
from tte_flash.processing import collate


def test_explain_shapes_and_real_pngs(tiny_model, rng, tmp_path):
    image = random_image(rng, 100, 80)
    result = tiny_model.explain({"text": "which is red", "image": image}, think_tokens=3, top_k=4,
                                heatmap_dir=tmp_path, max_new_tokens=4)
    assert len(result.top_tokens) == 3 and all(len(r) == 4 for r in result.top_tokens)
    probs = [p for _, p in result.top_tokens[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    record = tiny_model.processor({"image": image})
    _, h, w = record.image_grid_thw[0].tolist()
    assert result.attention.shape == (4, h // 2, w // 2)  # 3 think tokens + <emb>
    assert [p.rsplit("/", 1)[-1] for p in result.heatmaps] == ["attention.png"]  # one figure per query
    with Image.open(result.heatmaps[0]) as png:  # image + 5 panels (3 think, <emb>, mean) + colour bar: wide
        assert png.format == "PNG" and png.width > 3 * png.height
    assert isinstance(result.cot, str) and result.to_dict()["attention_shape"] == [4, h // 2, w // 2]


def test_recorded_attention_matches_attention_output(tiny_model, rng):
    """The recorded probabilities, applied to V, reproduce the attention output of those rows."""
    record = tiny_model.processor({"text": "q", "image": random_image(rng)})
    batch = collate([record], tiny_model.processor.think_token_ids, tiny_model.processor.emb_token_id,
                    think_tokens=2)
    gen = torch.Generator().manual_seed(0)
    n = batch.seq_ids.shape[1]
    q, k, v = (torch.randn(1, h, n, 8, generator=gen) for h in (4, 2, 2))
    from tte_flash.attention import TTELayout, _tte_attention_forward
    rows = torch.tensor([n - 3, n - 1])
    recorded = []
    layout = TTELayout(batch.seq_ids, batch.token_types, record_attention=recorded, record_rows=rows)
    module = torch.nn.Module()
    out, _ = _tte_attention_forward(module, q, k, v, layout, scaling=8 ** -0.5)
    probs = recorded[0]  # (rows, H, L)
    expected = torch.einsum("rhl,hld->rhd", probs, v[0].repeat_interleave(2, 0))
    torch.testing.assert_close(out[0, rows], expected, atol=1e-5, rtol=1e-5)
    ref = reference_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                              batch.seq_ids[0], batch.token_types[0], scale=8 ** -0.5)
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)
