"""Synthetic reasoning data: deterministic, balanced, weak shortcuts, answers that follow from the inputs."""
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tte_flash.data import EVAL_COLUMNS, TRAIN_COLUMNS, eval_example, load_rows, train_example
from tte_flash.synthetic import COLOURS, PALETTE, generate, main, shortcut_baselines, shortcut_metrics, shortcut_summary

STEP = {"right": (0, 1), "left": (0, -1), "up": (-1, 0), "down": (1, 0),
        "right of": (0, 1), "left of": (0, -1), "above": (-1, 0), "below": (1, 0)}


def read_grid(path) -> list[list[str]]:
    """Cell colours read back from the pixels (centre of each 28 px cell)."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    names = {tuple(rgb): name for name, rgb in PALETTE.items()}
    return [[names[tuple(pixels[r * 28 + 14, c * 28 + 14])] for c in range(3)] for r in range(3)]


def solve(query: str, image_path) -> str:
    """Answer a generated query from its image or its facts, independently of the generator."""
    if image_path:
        grid = read_grid(image_path)
        where = {colour: (r, c) for r, row in enumerate(grid) for c, colour in enumerate(row)}
        if m := re.search(r"row (\d), column (\d)", query):
            return grid[int(m[1]) - 1][int(m[2]) - 1]
        if m := re.search(r"cell (right of|left of|above|below) the (\w+) cell", query):
            moves, anchor = [m[1]], m[2]
        else:
            m = re.search(r"Start at the (\w+) cell, move (\w+), then (\w+)\.", query)
            moves, anchor = [m[2], m[3]], m[1]
        r, c = where[anchor]
        for move in moves:
            r, c = r + STEP[move][0], c + STEP[move][1]
        assert 0 <= r < 3 and 0 <= c < 3
        return grid[r][c]
    facts, question = query.split(" Q: ")
    if m := re.fullmatch(r"What colour is (\w+)'s (\w+)\?", question):
        return re.search(rf"{m[1]}'s {m[2]} is (\w+)\.", facts)[1]
    person = re.fullmatch(r"What colour is the thing (\w+) has\?", question)[1]
    thing = re.search(rf"{person} has the (\w+)\.", facts)[1]
    return re.search(rf"The {thing} is (\w+)\.", facts)[1]


CONFIGS = [("grid", 0), ("grid", 1), ("grid", 2), ("text", 1), ("text", 2), ("mixed", 2)]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return {(task, hops): generate(root / f"{task}{hops}", n_train=60, n_eval=360, seed=3, hops=hops, task=task)
            for task, hops in CONFIGS}


@pytest.mark.parametrize("task,hops", CONFIGS)
def test_rows_are_well_formed_and_answers_follow_from_inputs(datasets, task, hops):
    paths = datasets[(task, hops)]["paths"]
    root = Path(paths["image_root"])
    train = load_rows(paths["train"], TRAIN_COLUMNS)
    evals = load_rows(paths["eval"], EVAL_COLUMNS)
    assert len(train) == 60 and len(evals) == 360
    for row in train:
        example = train_example(row, root)  # every image exists (resolve_media checks)
        assert example["cot"] and row["pos_text"] in example["cot"]
        assert solve(row["qry"], example["query"].get("image")) == row["pos_text"]
        assert row["neg_text"] != row["pos_text"]
    for row in evals:
        query, candidates = eval_example(row, root)
        texts = [c["text"] for c in candidates]
        assert len(texts) == 8 and len(set(texts)) == 8 and set(texts) <= set(COLOURS)
        assert solve(row["qry_text"], query.get("image")) == texts[0]  # the positive is first
        named = [c for c in COLOURS if re.search(rf"\b{c}\b", row["qry_text"].split(" Q: ")[-1])]
        assert not set(named) & set(texts)  # never the colour the question names
        assert row["qry_cot"]
    with_image = [r for r in evals if r["qry_img_path"]]
    assert len(with_image) == {"grid": 360, "text": 0, "mixed": 180}[task]
    for row in with_image[:20]:
        assert Image.open(root / row["qry_img_path"]).size == (84, 84)


@pytest.mark.parametrize("task,hops", CONFIGS)
def test_answers_balanced_and_shortcuts_near_chance(datasets, task, hops):
    result = datasets[(task, hops)]
    evals = load_rows(result["paths"]["eval"])
    counts = Counter(r["tgt_text"][0] for r in evals)
    if task != "mixed":
        assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == len(COLOURS)
    shortcuts = shortcut_baselines(result["paths"]["eval"])  # recomputed from the files and images
    assert shortcuts == pytest.approx(result["stats"]["shortcuts_hit@1"])
    assert shortcuts["random"] == pytest.approx(1 / 8)
    assert {"most_frequent_answer", "answer_prior"} <= set(shortcuts)
    if task != "text":
        assert {"majority_colour", "present_in_image", "best_fixed_cell"} <= set(shortcuts)
    if task != "grid":
        assert {"named_in_query", "first_named", "last_named"} <= set(shortcuts)
    # the moves alone confine the answer on a 3x3 grid (training/README.md): a rule that sees them is far above
    # chance, and above the best fixed cell it refines; every other rule stays near chance
    leaky = {"best_cell_per_moves"}
    assert max(v for name, v in shortcuts.items() if name not in leaky) <= 1.5 / 8, shortcuts
    if task == "grid" and hops > 0:
        assert shortcuts["best_cell_per_moves"] >= shortcuts["best_fixed_cell"] + 0.03


def test_shortcuts_catch_a_biased_set(tmp_path):
    """The baselines are not near chance by construction: a set whose answer is always the majority
    colour (or always the same) is flagged."""
    rows = []
    for i in range(40):
        image = Image.new("RGB", (84, 84), "white")
        image.paste(PALETTE["red"], (0, 0, 84, 56))  # two thirds red
        image.paste(PALETTE[COLOURS[i % 7 + 1]], (0, 56, 84, 84))  # a negative
        image.save(tmp_path / f"{i}.png")
        rows.append({"qry_text": "<|image_1|> which colour?", "qry_img_path": f"{i}.png",
                     "tgt_text": ["red", *[c for c in COLOURS if c != "red"][:7]], "tgt_img_path": [""] * 8})
    shortcuts = shortcut_baselines(rows, tmp_path)
    assert shortcuts["majority_colour"] == 1.0 and shortcuts["most_frequent_answer"] == 1.0
    assert shortcuts["present_in_image"] == pytest.approx(0.5)  # red and one other colour present


def test_shortcut_summary_picks_the_best_rule(tmp_path):
    rows = []
    for i in range(12):  # the positive is always the colour the query names
        colours = [COLOURS[(i + j) % 8] for j in range(4)]
        rows.append({"qry_text": f"the {colours[0]} one", "qry_img_path": "", "tgt_text": colours, "tgt_img_path": [""] * 4})
    summary = shortcut_summary(rows, tmp_path)
    rules = shortcut_metrics(rows, tmp_path)
    assert summary["shortcuts"] == rules
    for metric in ("hit@1", "ndcg@5"):
        best = max(rules.values(), key=lambda m: m[metric])[metric]
        assert summary["shortcut_best"][metric] == best
        assert rules[summary["shortcut_best_name"][metric]][metric] == best
    assert summary["shortcut_best"]["hit@1"] == 1.0  # named_in_query, first_named
    assert rules["random"]["hit@1"] == pytest.approx(0.25)


def test_synthetic_does_not_import_the_evaluator():
    """The shortcut rules live here; the evaluator reports them. No import cycle between the two."""
    import subprocess
    import sys
    code = "import sys, tte_flash.synthetic; print('tte_flash.evaluate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_deterministic_by_seed(tmp_path):
    def files(out):
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    a = generate(tmp_path / "a", n_train=30, n_eval=20, seed=7, hops=2, task="mixed")
    b = generate(tmp_path / "b", n_train=30, n_eval=20, seed=7, hops=2, task="mixed")
    fa, fb = files(tmp_path / "a"), files(tmp_path / "b")
    fa.pop("meta.json"), fb.pop("meta.json")  # holds the generation time
    assert fa == fb and len(fa) == 3 + 15 + 10  # two JSONL files, README.md, images for half the rows
    c = generate(tmp_path / "c", n_train=30, n_eval=20, seed=8, hops=2, task="mixed")
    assert Path(c["paths"]["train"]).read_text() != Path(a["paths"]["train"]).read_text()
    # the eval split does not depend on n_train
    d = generate(tmp_path / "d", n_train=5, n_eval=20, seed=7, hops=2, task="mixed")
    assert Path(d["paths"]["eval"]).read_text() == Path(a["paths"]["eval"]).read_text()


def test_one_visual_token_per_cell(tiny_model, tmp_path):
    paths = generate(tmp_path, n_train=1, n_eval=1, seed=0, hops=1)["paths"]
    row = load_rows(paths["eval"])[0]
    record = tiny_model.processor(eval_example(row, paths["image_root"])[0])
    assert int(record.image_grid_thw.prod()) // 4 == 9


def test_cli_and_meta(tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path), "--n_train", "12", "--n_eval", "9", "--hops", "1",
                 "--n_candidates", "4", "--seed", "1"]) == 0
    assert "shortcuts" in capsys.readouterr().out
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["name"] == "synthetic-grid-1hop" and meta["n_candidates"] == 4 and meta["chance_hit@1"] == 0.25
    assert (tmp_path / "README.md").read_text().startswith("# synthetic-grid-1hop")
    assert all(len(r["tgt_text"]) == 4 for r in load_rows(tmp_path / "eval.jsonl"))
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 12


@pytest.mark.parametrize("kwargs,message", [({"hops": 3}, "hops"), ({"task": "video"}, "unknown task"),
                                            ({"n_candidates": 9}, "n_candidates"),
                                            ({"task": "text", "hops": 0}, "grid task only")])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, n_train=1, n_eval=1, **kwargs)
