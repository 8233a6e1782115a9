"""The tiny-reasoner additions: one-word hop tasks, the hop cap, the new eval kinds, resumable pretraining
and the shipped tiny-reasoner preset (training/README.md, "The tiny-reasoner backbone")."""
import json
import re

import numpy as np
import pytest
import torch

from tte_flash import TTEFlashModel
from tte_flash.modeling import PRESET_DIR
from tte_flash.world import (ALL_EVAL_KINDS, EVAL_KINDS, NEW_EVAL_KINDS, TASK_WEIGHTS, World, eval_questions,
                             evaluate_backbone)

from test_world import STEP, read_grid
from conftest import load_script



def solve_short(sample) -> str:
    """The one word a move_short / text_short sample must answer, from the image or the facts alone."""
    prompt = sample["prompt"]
    assert prompt.endswith(" Answer with one word.")
    prompt = prompt[:-len(" Answer with one word.")]
    if sample["image"] is None:
        facts, _, question = prompt.rpartition(" Q: ")
        if m := re.fullmatch(r"(?:What|Which) colour is (\w+)'s (\w+)\?", question):
            return re.search(rf"{m[1]}'s {m[2]} is (\w+)\.", facts)[1]
        person = re.fullmatch(r"(?:What|Which) colour is the thing (\w+) has\?", question)[1]
        thing = re.search(rf"{person} has the (\w+)\.", facts)[1]
        return re.search(rf"The {thing} is (\w+)\.", facts)[1]
    grid = read_grid(sample["image"])
    where = {}
    for r, row in enumerate(grid):
        for c, colour in enumerate(row):
            where.setdefault(colour, []).append((r, c))
    start = re.search(r"(?:the (\w+) cell|row (\d), column (\d))", prompt)
    if start[1]:
        assert len(where[start[1]]) == 1  # a named anchor is the only cell of its colour
        r, c = where[start[1]][0]
    else:
        r, c = int(start[2]) - 1, int(start[3]) - 1
    for move in re.findall(r"right of|left of|above|below|\bright\b|\bleft\b|\bup\b|\bdown\b", prompt):
        r, c = r + STEP[move][0], c + STEP[move][1]
        assert 0 <= r < len(grid) and 0 <= c < len(grid[0])
    return grid[r][c]


def hops_of(sample) -> int:
    if sample["image"] is None:
        return 2 if "the thing" in sample["prompt"] else 1
    return len(re.findall(r"right of|left of|above|below|\bright\b|\bleft\b|\bup\b|\bdown\b", sample["prompt"]))


def test_one_word_tasks_answer_what_the_image_or_the_facts_say():
    world = World(seed=11, task_weights={"move_short": 1, "text_short": 1})
    hops = {"move_short": set(), "text_short": set()}
    for _ in range(400):
        s = world.sample()
        assert re.fullmatch(r"\w+\.", s["answer"]), s["answer"]  # one word, no trace
        assert s["answer"][:-1] == solve_short(s), s
        hops[s["task"]].add(hops_of(s))
    assert hops == {"move_short": {1, 2}, "text_short": {1, 2}}


def test_max_hops_caps_every_hop_task():
    world = World(seed=5, task_weights={"move": 1, "move_short": 1, "text": 1, "text_short": 1}, max_hops=1)
    for _ in range(400):
        s = world.sample()
        if s["task"] == "move":
            assert s["answer"].count(":") == 0  # traces of 2+ hops spell "right: row ..."
        else:
            assert hops_of(s) <= 1, s["prompt"]


def test_default_world_stream_is_unchanged_by_the_new_tasks():
    """max_hops=None draws exactly what the world drew before (tiny-instruct's build means the same)."""
    a, b = World(seed=3), World(seed=3, task_weights=dict(TASK_WEIGHTS), max_hops=None)
    for _ in range(100):
        x, y = a.sample(), b.sample()
        assert (x["task"], x["prompt"], x["answer"]) == (y["task"], y["prompt"], y["answer"])
    assert EVAL_KINDS == ("position_3x3", "position_any", "move1_trace", "move2_trace", "count", "text")
    assert ALL_EVAL_KINDS[:len(EVAL_KINDS)] == EVAL_KINDS


def test_new_eval_kinds_are_well_formed():
    for kind in NEW_EVAL_KINDS:
        questions = eval_questions(kind, 30)
        assert len({q["prompt"] for q in questions}) > 20
        for q in questions:
            if kind == "locate":
                grid = read_grid(q["image"])
                colour = re.search(r"(?:the |is )(\w+)(?: cell)?[.?]", q["prompt"])[1]
                cells = [(r, c) for r, row in enumerate(grid) for c, x in enumerate(row) if x == colour]
                assert len(cells) == 1 and q["final"] == f"row {cells[0][0] + 1} column {cells[0][1] + 1}"
            else:
                assert q["final"] == solve_short(q) and hops_of(q) == (2 if "2" in kind else 1)


class _Echo:
    """A stand-in model whose greedy reply is the reference (or a wrong one), to check the scoring."""

    def __init__(self, wrong=False):
        self.wrong, self.questions = wrong, {}

    def generate_traces(self, items, max_new_tokens, batch_size):
        return [("nothing." if self.wrong else self.questions[i["text"]]) for i in items]


def test_locate_is_scored_on_the_whole_position():
    model = _Echo()
    for kind in ("locate", "move1_short"):
        model.questions.update({q["prompt"]: q["answer"] for q in eval_questions(kind, 5)})
    result = evaluate_backbone(model, n=5, kinds=("locate", "move1_short"))
    assert result["locate_answer"] == result["move1_short_answer"] == 1.0
    assert evaluate_backbone(_Echo(wrong=True), n=5, kinds=("locate",))["locate_answer"] == 0.0


# ---------------------------------------------------------------------------------------- resumable pretraining

def _pretrain_main():
    return load_script("training/pretrain.py", "pretrain_under_test").main


@pytest.mark.parametrize("pause", [[], ["--pause_tokens", "2", "--pause_p", "0.5"]], ids=["plain", "pause"])
def test_pretrain_resumes_from_a_checkpoint_with_the_same_losses(tmp_path, pause):
    main = _pretrain_main()
    common = ["--max_steps", "8", "--save_steps", "4", "--logging_steps", "1", "--batch_size", "4",
              "--eval_steps", "0", "--eval_n", "1", "--eval_kinds", "move1_short", "--hidden_size", "32",
              "--intermediate_size", "64", "--num_layers", "2", "--num_heads", "2", "--mrope_section", "2", "3", "3",
              "--vision_depth", "1", "--vocab_size", "400", "--corpus_size", "1000", "--max_hops", "1",
              "--task_weights", "move_short=1,text_short=1,locate=1", "--threads", "1", *pause]
    threads = torch.get_num_threads()
    try:
        straight = main(["--output_dir", str(tmp_path / "straight"), *common])
        main(["--output_dir", str(tmp_path / "killed"), "--stop_at_step", "4", *common])
        ckpts = sorted(p.name for p in (tmp_path / "killed/checkpoints").glob("checkpoint-*"))
        assert ckpts == ["checkpoint-4"]
        resumed = main(["--output_dir", str(tmp_path / "killed"), "--resume_from_checkpoint", "auto", *common])
    finally:
        torch.set_num_threads(threads)
    assert resumed["resumed_from"].endswith("checkpoint-4")

    def losses(summary):
        return {e["step"]: e["loss"] for e in summary["log_history"] if "loss" in e}

    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([b[s] for s in range(1, 9)], [a[s] for s in range(1, 9)], rtol=1e-4)
    # and the exported weights agree
    wa = TTEFlashModel.from_backbone(tmp_path / "straight", max_think_tokens=1).state_dict()
    wb = TTEFlashModel.from_backbone(tmp_path / "killed", max_think_tokens=1).state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


# ---------------------------------------------------------------------------------------- the shipped preset

needs_reasoner = pytest.mark.skipif(not (PRESET_DIR / "tiny-reasoner" / "model.safetensors").is_file(),
                                    reason="tiny-reasoner weights not built yet (bash training/build_tiny_reasoner.sh)")


@needs_reasoner
def test_tiny_reasoner_preset_equals_from_backbone_on_its_directory():
    a = TTEFlashModel.from_preset("tiny-reasoner").eval()
    b = TTEFlashModel.from_backbone(PRESET_DIR / "tiny-reasoner", max_think_tokens=32, image_min_pixels=3136,
                                    image_max_pixels=50176).eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    config = json.loads((PRESET_DIR / "tiny-reasoner" / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and config["text_config"]["num_hidden_layers"] == 8
    assert (PRESET_DIR / "tiny-reasoner" / "model.safetensors").stat().st_size <= 20 * 2 ** 20
    query = {"image": World(seed=0).sample("cell")["image"], "text": "What colour is the cell left of the red cell?"}
    np.testing.assert_array_equal(a.encode_query(query, think_tokens=16), b.encode_query(query, think_tokens=16))
