"""What the think tokens hold: a logit-lens reading per think token, the decoded CoT, and attention
heatmaps from the think tokens (and ``<emb>``) to the image patches.

* Textual: each think token's final hidden state goes through the LM head; its top-k vocabulary
  tokens are reported, with the chain of thought :meth:`TTEFlashModel.generate_cot` decodes.
* Visual: the forward runs on the reference attention with the attention probabilities of the
  think/``<emb>`` rows recorded per layer; they are averaged over the chosen layers and heads,
  restricted to the first image's tokens (one per 2x2 merged patch) and drawn over the image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .mask import EMB, THINK
from .processing import collate, load_image, normalize_input


@dataclass
class Explanation:
    think_tokens: int
    top_tokens: list[list[tuple[str, float]]]  # per think token: (token, probability), best first
    emb_top_tokens: list[tuple[str, float]]
    cot: str
    attention: torch.Tensor | None = None  # (K+1, gh, gw): think tokens then <emb>, over image patches
    heatmaps: list[str] = field(default_factory=list)  # PNG paths

    def to_dict(self) -> dict:
        return {"think_tokens": self.think_tokens, "cot": self.cot, "emb_top_tokens": self.emb_top_tokens,
                "top_tokens": self.top_tokens, "heatmaps": self.heatmaps,
                "attention_shape": list(self.attention.shape) if self.attention is not None else None}


@torch.inference_mode()
def explain(model, query, *, think_tokens: int | None = None, top_k: int = 5, layers=None, heads=None,
            max_new_tokens: int = 64, heatmap_dir: str | Path | None = None) -> Explanation:
    """Explain one query; see the module docstring. ``layers``/``heads``: indices to average over
    (default all); ``heatmap_dir``: where to write PNGs (none written when None)."""
    think_tokens = model.config.default_think_tokens if think_tokens is None else think_tokens
    model._check_think_tokens(think_tokens)
    model.eval()
    item = normalize_input(query)
    record = model.processor(item)
    batch = collate([record], model.processor.think_token_ids, model.processor.emb_token_id,
                    think_tokens=think_tokens)
    rows = ((batch.token_types[0] == THINK) | (batch.token_types[0] == EMB)).nonzero().flatten()
    recorded: list[torch.Tensor] = []
    out = model._text_forward(batch, record_attention=recorded, record_rows=rows.to(model.device),
                              backend="reference")
    logits = model.lm_head(out.last_hidden_state[0, rows]).float()  # (K+1, V)
    logits[:, len(model.processor.tokenizer):] = float("-inf")  # padding rows of the vocabulary
    values, ids = logits.softmax(-1).topk(top_k, dim=-1)
    decode = model.processor.tokenizer.decode
    readings = [[(decode([i]), round(float(v), 4)) for i, v in zip(row_ids.tolist(), row_values)]
                for row_ids, row_values in zip(ids, values)]
    cot = model.generate_cot(item, think_tokens=think_tokens, max_new_tokens=max_new_tokens) if think_tokens else ""
    result = Explanation(think_tokens=think_tokens, top_tokens=readings[:-1], emb_top_tokens=readings[-1], cot=cot)
    if record.image_grid_thw is not None:
        result.attention = _image_attention(model, recorded, batch, record, layers, heads)
        if heatmap_dir is not None:
            result.heatmaps = draw_heatmaps(load_image(item["image"]), result.attention, Path(heatmap_dir))
    return result


def _image_attention(model, recorded, batch, record, layers, heads) -> torch.Tensor:
    stacked = torch.stack(recorded).cpu()  # (layers, K+1, H, L)
    stacked = stacked[list(layers)] if layers is not None else stacked
    stacked = stacked[:, :, list(heads)] if heads is not None else stacked
    weights = stacked.mean(dim=(0, 2))  # (K+1, L)
    image_columns = (batch.input_ids[0].cpu() == model.config.image_token_id).nonzero().flatten()
    merge = model.config.vision_config.spatial_merge_size
    _, h, w = (int(x) for x in record.image_grid_thw[0])
    first_image = image_columns[: (h // merge) * (w // merge)]
    return weights[:, first_image].reshape(-1, h // merge, w // merge)


def draw_heatmaps(image, attention: torch.Tensor, out_dir: Path) -> list[str]:
    """One figure (``attention.png``): the image, then the attention of each think token, of ``<emb>`` and
    the mean over the think tokens, as panels beside it on one shared colour scale with a colour bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    maps = [(f"think {i}", attention[i]) for i in range(attention.shape[0] - 1)]
    maps.append(("<emb>", attention[-1]))
    if attention.shape[0] > 1:
        maps.append((f"mean of {attention.shape[0] - 1} think", attention[:-1].mean(0)))
    columns = min(6, len(maps) + 1)
    rows = -(-(len(maps) + 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns + 1, 2.3 * rows), squeeze=False)
    axes = axes.ravel()
    axes[0].imshow(image)
    axes[0].set_title("image")
    top = max(float(grid.max()) for _, grid in maps) or 1.0
    for ax, (title, grid) in zip(axes[1:], maps):
        shown = ax.imshow(grid.numpy(), cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest",
                          aspect=image.height / image.width * grid.shape[1] / grid.shape[0])
        ax.set_title(title)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=list(axes), shrink=0.8, label="attention to each image patch\n(mean over layers and heads)")
    path = out_dir / "attention.png"
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return [str(path)]
