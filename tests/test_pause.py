"""Pause-pretraining (issue 15, arXiv 2310.02226): think tokens between prompt and answer in the backbone's
pretraining, laid out as in TTE training, kept by the exported backbone and reused by ``from_backbone``."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tte_flash import TTEFlashModel
from tte_flash.mask import COT, QUERY, THINK
from tte_flash.tokenization import think_token
from tte_flash.world import World
from conftest import load_script

SMALL = ["--hidden_size", "32", "--intermediate_size", "64", "--num_layers", "2", "--num_heads", "2",
         "--mrope_section", "2", "3", "3", "--vision_depth", "1", "--vocab_size", "400", "--corpus_size", "1000",
         "--max_hops", "1", "--task_weights", "move_short=1,text_short=1", "--threads", "1"]


def _pretrain_module():
    return load_script("training/pretrain.py", "pretrain_pause_under_test")


@pytest.fixture(scope="module")
def pretrain():
    return _pretrain_module()


@pytest.fixture(scope="module")
def paused(pretrain, tmp_path_factory):
    out = tmp_path_factory.mktemp("pause") / "backbone"
    threads = torch.get_num_threads()
    try:
        pretrain.main(["--output_dir", str(out), "--max_steps", "3", "--batch_size", "4", "--eval_steps", "0",
                       "--eval_n", "2", "--eval_kinds", "move1_short", "--pause_tokens", "3", "--pause_p", "1",
                       "--learning_rate", "1e-2", *SMALL])
    finally:
        torch.set_num_threads(threads)
    return out


def think_before_emb(batch) -> list[tuple[int, int]]:
    """(K, flat <emb> index) of each sample, in record order: the think tokens right before its <emb> (rows may
    hold several samples: the pretraining collator fills them)."""
    types = batch.token_types.reshape(-1)
    out = []
    for emb in batch.emb_index.tolist():
        k = 0
        while emb - k - 1 >= 0 and int(types[emb - k - 1]) == THINK:
            k += 1
        out.append((k, emb))
    return out


@pytest.mark.parametrize("p, expect", [(1.0, {3}), (0.0, {0})])
def test_collator_puts_the_pause_tokens_between_prompt_and_answer(paused, pretrain, p, expect):
    model = TTEFlashModel.from_backbone(paused, max_think_tokens=3)
    collator = pretrain.PretrainCollator(model.processor, pause_tokens=3, pause_p=p, seed=0)
    world = World(seed=5)
    samples = [world.sample("move_short") for _ in range(4)]  # different samples: rows may hold several
    batch = collator(samples)["batch"]
    think_ids = model.processor.think_token_ids
    ids, types = batch.input_ids.reshape(-1), batch.token_types.reshape(-1)
    per_sample = think_before_emb(batch)
    assert len(per_sample) == 4 and {k for k, _ in per_sample} == expect
    for k, emb in per_sample:
        # [prompt][think 0..k-1][emb][answer]: the think tokens right before <emb>, in order, then the answer
        assert ids[emb - k:emb].tolist() == think_ids[:k]
        assert int(types[emb - k - 1]) == QUERY and int(types[emb + 1]) == COT
    # the first answer token of the first sample is predicted from its last think token (its last prompt token
    # without pauses)
    assert int(batch.cot_pred_index[0]) == per_sample[0][1] - 1
    assert int(types[batch.cot_pred_index[0]]) == (THINK if p else QUERY)


def test_pause_share_is_seeded(paused, pretrain):
    model = TTEFlashModel.from_backbone(paused, max_think_tokens=3)
    world = World(seed=6)
    samples = [world.sample("move_short") for _ in range(40)]

    def ks(seed):
        batch = pretrain.PretrainCollator(model.processor, pause_tokens=3, pause_p=0.5, seed=seed)(samples)["batch"]
        return [k for k, _ in think_before_emb(batch)]

    assert ks(1) == ks(1) and ks(1) != ks(2)  # the draws, sample by sample, follow the seed
    assert set(ks(1)) == {0, 3} and 8 <= ks(1).count(3) <= 32


def test_exported_backbone_keeps_its_pause_tokens(paused):
    vocab = json.loads((paused / "tokenizer.json").read_text())
    added = {t["content"] for t in vocab["added_tokens"]}
    assert {think_token(i) for i in range(3)} <= added
    saved = load_file(paused / "model.safetensors")
    key = next(k for k in saved if k.endswith("embed_tokens.weight"))
    model = TTEFlashModel.from_backbone(paused, max_think_tokens=5)
    ids = model.config.think_token_ids
    rows = model.get_input_embeddings().weight.detach()
    # the three pretrained think tokens keep their rows ...
    torch.testing.assert_close(rows[ids[:3]], saved[key][ids[:3]], rtol=0, atol=0)
    # ... the two new ones are initialised near the mean of the existing rows, not left as they were saved
    n_existing = min(ids[3:])
    mean = rows[:n_existing].mean(0)
    assert torch.all((rows[ids[3:]] - mean).norm(dim=-1) < 0.5 * (rows[:n_existing] - mean).norm(dim=-1).mean())
    summary = json.loads((paused / "pretrain_summary.json").read_text())
    assert "pause_move1_short_answer" in summary["final"]


def test_pause_probe_agrees_with_greedy_decoding(paused):
    probe = load_script("training/pause_probe.py", "pause_probe_under_test")
    from tte_flash.world import eval_questions
    model = TTEFlashModel.from_backbone(paused, max_think_tokens=3).eval()
    questions = eval_questions("move1_short", 12)
    for k in (0, 3):
        records = [model.processor({"image": q["image"], "text": q["prompt"]}, i) for i, q in enumerate(questions)]
        greedy = [ids[0] for ids in model._decode_from_think(records, k, 1)]  # step-by-step decoding, another path
        wanted = [model.processor.tokenize_cot(q["answer"])[0] for q in questions]
        predicted, reference = probe.first_token_predictions(model, questions, k, batch_size=5)
        assert predicted == greedy and reference == wanted
        assert probe.first_token_accuracy(model, questions, k) == sum(a == b for a, b in zip(greedy, wanted)) / 12


# ---------------------------------------------------------------------------------------- the shipped preset

def test_tiny_thinker_preset_loads_offline_with_its_pretrained_think_tokens():
    """tiny-thinker (tiny-reasoner pause-pretrained with 16 think tokens) equals from_backbone on its folder, and
    its first 16 think-token rows are the pretrained ones, not re-initialised (the tokens 17-32 are new)."""
    from tte_flash.loading import PRESET_DIR

    folder = PRESET_DIR / "tiny-thinker"
    a = TTEFlashModel.from_preset("tiny-thinker").eval()
    b = TTEFlashModel.from_backbone(folder, max_think_tokens=32, image_min_pixels=3136, image_max_pixels=50176).eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (folder / "model.safetensors").stat().st_size <= 20 * 2 ** 20
    saved = load_file(folder / "model.safetensors")
    rows = next(v for k, v in saved.items() if k.endswith("embed_tokens.weight"))
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    pretrained = [ids[think_token(i)] for i in range(16)]
    embedding = a.get_input_embeddings().weight
    assert [a.processor.tokenizer.convert_tokens_to_ids(think_token(i)) for i in range(16)] == pretrained
    assert torch.equal(embedding[pretrained], rows[pretrained])
    assert think_token(16) not in ids  # the 17th think token is new to this backbone
    query = {"image": World(seed=0).sample("cell")["image"], "text": "What colour is the cell above row 2, column 1?"}
    assert torch.allclose(torch.as_tensor(a.encode_query(query, think_tokens=16)),
                          torch.as_tensor(b.encode_query(query, think_tokens=16)))
