"""The pretraining world, its tokenizer, the pretraining stage and the shipped tiny-instruct preset."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tte_flash import TTEFlashModel
from tte_flash.modeling import PRESET_DIR
from tte_flash.tokenization import EMB_TOKEN, QWEN2_VL_SPECIAL_TOKENS, add_tte_tokens, think_token, train_word_tokenizer
from tte_flash.world import CELL, MOVES, PALETTE, World, corpus_text, eval_questions, evaluate_backbone, last_word

ROOT = Path(__file__).resolve().parent.parent
STEP = {**MOVES, "right of": (0, 1), "left of": (0, -1), "above": (-1, 0), "below": (1, 0)}


def read_grid(image) -> list[list[str]]:
    """Cell colours read back from the pixels (centre of each cell), independently of the generator."""
    pixels = np.asarray(image)
    names = {tuple(rgb): name for name, rgb in PALETTE.items()}
    rows, cols = pixels.shape[0] // CELL, pixels.shape[1] // CELL
    return [[names[tuple(pixels[r * CELL + CELL // 2, c * CELL + CELL // 2])] for c in range(cols)] for r in range(rows)]


def solve(sample) -> str:
    """The reply a world sample must end with, worked out from the image or the facts alone."""
    prompt = sample["prompt"]
    if sample["image"] is None:  # several questions: the reply ends with the last one's answer
        facts, _, question = prompt.rpartition(" Q: ")
        if m := re.fullmatch(r"(?:What|Which) colour is (\w+)'s (\w+)\?", question):
            return re.search(rf"{m[1]}'s {m[2]} is (\w+)\.", facts)[1]
        person = re.fullmatch(r"(?:What|Which) colour is the thing (\w+) has\?", question)[1]
        thing = re.search(rf"{person} has the (\w+)\.", facts)[1]
        return re.search(rf"The {thing} is (\w+)\.", facts)[1]
    grid = read_grid(sample["image"])
    where = {c: (r, k) for r, row in enumerate(grid) for k, c in enumerate(row)}
    if m := re.search(r"How many (\w+) cells|Count the (\w+) cells|How many cells are (\w+)", prompt):
        colour = next(g for g in m.groups() if g)
        return str(sum(c == colour for row in grid for c in row))
    if m := re.fullmatch(r"Where is the (\w+) cell\?|Which cell is (\w+)\?|Find the (\w+) cell\.", prompt):
        r, c = where[next(g for g in m.groups() if g)]
        return str(c + 1)  # "... at row R column C."
    if prompt.startswith("Describe"):
        return grid[int(m[1]) - 1][-1] if (m := re.match(r"Describe row (\d)", prompt)) else grid[-1][-1]
    if "each of these cells" in prompt or prompt.startswith("Name the colours"):  # the last position asked
        r, c = re.findall(r"row (\d), column (\d)", prompt)[-1]
        return grid[int(r) - 1][int(c) - 1]
    start = re.search(r"(?:at |of )?(?:the (\w+) cell|row (\d),? column (\d))", prompt)
    r, c = where[start[1]] if start[1] else (int(start[2]) - 1, int(start[3]) - 1)
    moves = re.findall(r"right of|left of|above|below|\bright\b|\bleft\b|\bup\b|\bdown\b", prompt)
    for move in moves:
        r, c = r + STEP[move][0], c + STEP[move][1]
    assert 0 <= r < len(grid) and 0 <= c < len(grid[0])
    return grid[r][c]


def test_world_answers_follow_from_the_image_or_the_facts():
    world = World(seed=7)
    seen = set()
    for _ in range(600):
        sample = world.sample()
        seen.add(sample["task"])
        assert last_word(sample["answer"]) == solve(sample), sample
        if sample["image"] is not None:
            rows, cols = len(sample["grid"]), len(sample["grid"][0])
            assert 2 <= rows <= 5 and 2 <= cols <= 5 and sample["image"].size == (cols * CELL, rows * CELL)
    assert seen == {"cell", "cells", "cell_short", "locate", "describe", "move", "count", "text"}


def test_world_is_seeded_and_covers_the_palette():
    a, b = World(seed=3), World(seed=3)
    samples = [(a.sample(), b.sample()) for _ in range(50)]
    assert all(x["prompt"] == y["prompt"] and x["answer"] == y["answer"] for x, y in samples)
    colours = {c for x, _ in samples if x["grid"] for row in x["grid"] for c in row}
    assert len(PALETTE) >= 16 and len(colours) >= 16
    other = World(seed=4)
    assert [other.sample()["prompt"] for _ in range(10)] != [x["prompt"] for x, _ in samples[:10]]


def test_eval_questions_are_held_out_and_well_formed():
    for kind in ("position_3x3", "move1_trace", "move2_trace"):
        questions = eval_questions(kind, 40)
        for q in questions:
            assert q["final"] == solve(q)
        if kind == "position_3x3":
            assert all(q["image"].size == (3 * CELL, 3 * CELL) for q in questions)
        if kind == "move2_trace":
            assert all(q["answer"].count(":") == 2 for q in questions)


@pytest.fixture(scope="module")
def word_tokenizer():
    return train_word_tokenizer(corpus_text(2000, seed=0), vocab_size=600)


def test_word_tokenizer_makes_words_tokens(word_tokenizer):
    trace = "the red cell is at row 1 column 2. right of it is row 1 column 3. that cell is blue."
    ids = word_tokenizer(trace, add_special_tokens=False).input_ids
    assert len(ids) <= 1.25 * len(trace.split()) < len(trace.encode()) / 3  # about a token a word, not a byte
    assert word_tokenizer.decode(ids) == trace


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=0, max_size=60))
def test_word_tokenizer_round_trips_any_text(word_tokenizer, text):
    ids = word_tokenizer(text, add_special_tokens=False).input_ids
    assert word_tokenizer.decode(ids) == text


def test_word_tokenizer_keeps_special_tokens_single(word_tokenizer):
    import copy
    tokenizer = copy.deepcopy(word_tokenizer)
    think_ids, emb_id = add_tte_tokens(tokenizer, 4)
    for token in [*QWEN2_VL_SPECIAL_TOKENS, think_token(0), think_token(3), EMB_TOKEN]:
        ids = tokenizer(f"a {token}b", add_special_tokens=False).input_ids
        assert tokenizer.convert_tokens_to_ids(token) in ids, token
    assert len(set(think_ids + [emb_id])) == 5


# ---------------------------------------------------------------------------------------- pretraining

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "backbone"
    cmd = [sys.executable, str(ROOT / "training/pretrain.py"), "--output_dir", str(out), "--max_steps", "6",
           "--batch_size", "4", "--eval_steps", "3", "--eval_n", "2", "--hidden_size", "32", "--intermediate_size",
           "64", "--num_layers", "1", "--num_heads", "2", "--mrope_section", "2", "3", "3", "--vocab_size", "400"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return out


def test_pretrain_writes_a_plain_qwen2_vl_backbone(pretrained):
    config = json.loads((pretrained / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 3]
    vocab = json.loads((pretrained / "tokenizer.json").read_text())["model"]["vocab"]
    assert EMB_TOKEN not in vocab and think_token(0) not in vocab  # a backbone has no TTE tokens
    summary = json.loads((pretrained / "pretrain_summary.json").read_text())
    assert [e["step"] for e in summary["evaluations"]] == [3, 6]
    losses = [e["loss"] for e in summary["log_history"] if "loss" in e]
    assert all(np.isfinite(losses))


def test_pretrained_backbone_starts_tte_training(pretrained):
    model = TTEFlashModel.from_backbone(pretrained, max_think_tokens=4)
    from transformers import Qwen2VLForConditionalGeneration
    plain = Qwen2VLForConditionalGeneration.from_pretrained(pretrained).eval()
    from transformers import AutoTokenizer
    n_base = len(AutoTokenizer.from_pretrained(pretrained))  # rows from here on are the new TTE tokens
    ids = model.processor.tokenizer("row 1 column 2 is", return_tensors="pt").input_ids
    with torch.no_grad():  # the backbone's weights arrive unchanged (the new rows aside)
        expected = plain(input_ids=ids).logits[0, -1, :n_base]
        got = model.eval()(input_ids=ids).logits[0, -1, :n_base]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    result = evaluate_backbone(model, n=2, kinds=("position_3x3",), max_new_tokens=4)
    assert 0 <= result["position_3x3_answer"] <= 1


# ---------------------------------------------------------------------------------------- the shipped preset

needs_preset = pytest.mark.skipif(not (PRESET_DIR / "tiny-instruct" / "model.safetensors").is_file(),
                                  reason="tiny-instruct weights not built")


@needs_preset
def test_tiny_instruct_preset_equals_from_backbone_on_its_directory():
    a = TTEFlashModel.from_preset("tiny-instruct").eval()
    b = TTEFlashModel.from_backbone(PRESET_DIR / "tiny-instruct", max_think_tokens=32, image_min_pixels=3136,
                                    image_max_pixels=50176).eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    query = {"image": World(seed=0).sample("cell")["image"], "text": "What colour is the cell in row 1, column 2?"}
    np.testing.assert_array_equal(a.encode_query(query, think_tokens=16), b.encode_query(query, think_tokens=16))
    assert len(a.processor.tokenizer("row 2 column 3", add_special_tokens=False).input_ids) <= 6


@needs_preset
def test_tiny_instruct_reads_positions():
    """The shipped backbone answers positional questions on held-out 3x3 grids (the issue's target is
    >= 95%; the test asserts a margin far above chance, 1 in 9)."""
    model = TTEFlashModel.from_preset("tiny-instruct")
    result = evaluate_backbone(model, n=30, kinds=("position_3x3",), max_new_tokens=12)
    assert result["position_3x3_answer"] >= 0.8, result


@needs_preset
def test_tte_training_from_tiny_instruct_learns_a_grid_lookup(tmp_path):
    """The CPU world learns: from tiny-instruct, 150 steps at K=0 with the COT loss retrieve the colour at
    a position far above chance (1 in 8) on held-out images (random `tiny` stays at chance here; the
    recipe with think tokens and its numbers: training/README.md)."""
    from tte_flash import synthetic
    from tte_flash.evaluate import evaluate_many
    from tte_flash.training import main as train_main
    paths = synthetic.generate(tmp_path / "data", 1200, 64, seed=3, hops=0, task="grid")["paths"]
    train_main(["--model", "tiny-instruct", "--train_data", paths["train"], "--image_root", paths["image_root"],
                "--output_dir", str(tmp_path / "run"), "--think_tokens", "0", "--cot_weight", "1", "--max_steps",
                "150", "--per_device_train_batch_size", "32", "--learning_rate", "5e-4", "--warmup_steps", "20",
                "--temperature", "0.05", "--use_cpu", "--save_strategy", "no", "--seed", "0", "--disable_tqdm", "true",
                "--logging_steps", "10"])
    model = TTEFlashModel.from_pretrained(tmp_path / "run")
    result = evaluate_many(model, paths["eval"], paths["image_root"], think_tokens=(0,), modes=("latent",))
    assert result["runs"][0]["metrics"]["hit@1"] >= 0.4, result["runs"][0]["metrics"]
