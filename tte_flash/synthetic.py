"""Synthetic reasoning-retrieval data: small enough for the ``tiny`` preset on a CPU, with weak shortcuts.

    python -m tte_flash.synthetic --output_dir data --n_train 2000 --n_eval 200 --seed 0 --hops 1 \\
        [--task grid|text|mixed] [--n_candidates 8] [--grid 3] [--palette basic|world] [--sampling legacy|region] \\
        [--anchor colour|position]

writes ``train.jsonl`` (MMEB-train columns + ``qry_cot``), ``eval.jsonl`` (MMEB-eval columns, positive
first), ``images/{train,eval}/*.png``, ``meta.json`` and ``README.md``. Answers are colour names.

**grid** (image): a ``grid`` x ``grid`` grid of solid cells (3x3 by default, 2 to 4 with the 20-colour
world palette: every colour appears at most once, so a 5x5 grid needs more colours than any palette
has), 28 px each, coloured with a random choice of distinct colours of the palette (:data:`PALETTE`'s
nine by default). A cell is 2x2 patches of 14 px, i.e. exactly one visual token after Qwen2-VL's 2x2
merge (9 visual tokens per 3x3 image).

* ``hops=0``: "What colour is the cell in row 2, column 3?" (a direct lookup; a sanity level);
* ``hops=1``: "What colour is the cell right of the red cell?" (find the cell, move, read);
* ``hops=2``: "Start at the red cell, move right, then down. What colour is that cell?".

With ``--anchor position`` the walk starts at a named position instead of a named colour ("What colour
is the cell right of row 2, column 3?", "Start at row 2, column 3, move up, then left. ..."; trace "start at
row 2 column 3. right of it is row 2 column 4. that cell is blue."): no search for the anchor, only the
moves and one read, the world's position-anchored wording (``tte_flash.world``). Moves stay on the grid and
never undo the one before. The trace spells every step: "the red cell is at
row 1 column 2. right of it is row 1 column 3. that cell is blue." The train row's hard negative is the
cell one step short (two hops) or another neighbour of the anchor (one hop).

Sampling (``--sampling``) decides where the answer cell is and which colours are candidates:

* ``legacy`` (the default; data sets regenerate byte for byte): the answer cell uniform over the grid,
  then a path to it; candidates are the positive plus ``n_candidates - 1`` other colours of the image,
  never the colour the question names (3x3, 8 candidates: every colour but the named one). **The moves
  leak the answer**: they must stay on the grid, so "left of X" puts the answer out of the last column,
  and ranking candidates by their cell for each sequence of moves, without reading the anchor colour
  (``best_cell_per_moves``), gets Hit@1 0.26 / 0.38 on 3x3 at 1 / 2 hops and 0.20 / 0.30 on 4x4 (chance
  0.125). Read no legacy grid score as reasoning beyond the moves.
* ``region``: the moves first (uniform over the sequences that fit on the grid), then the answer cell
  uniform over the moves' *region* (the cells where they can end), the anchor behind it; the
  ``n_candidates - 1`` negatives are colours of other region cells (never the anchor's), and so is the
  train row's hard negative (where the one-step-short cell or the anchor's other neighbours lie outside the
  region: another region cell). Given the moves, the answer is any region cell and every candidate is in
  the region, so the moves say nothing. It needs enough region cells: with 8 candidates only the 4x4 grid
  (at 2 hops "left, left" ends in 8 cells, the anchor outside them: exactly 7 negatives); 3x3 allows at
  most 5 candidates at 1 hop and 3 at 2 hops; anything more is a ValueError naming the short region.
  What it leaves: the moves' population edge is ~0.01 (a fixed cell per sequence of moves scores 0.131 /
  0.136 at 1 / 2 hops on 4x4: the anchor, never a candidate, is a tie where another cell would be a miss);
  and since the anchor colour is never a candidate, a rule that sees the whole candidate list, walks each
  candidate's cell back by the moves and keeps those landing on a non-candidate colour, finds the answer
  without reading the anchor colour (0.22 / 0.18 on 4x4; legacy 0.29 / 0.42 on 4x4 and 1.0 on 3x3 with 8
  candidates). It still takes the spatial step, and an embedder, which scores one candidate at a time
  against a query embedded without them, cannot use it.

**text** (no image): facts, then a question. ``hops=1``: "Ann's hat is red. Bob's hat is blue. ...
Q: What colour is Bob's hat?"; ``hops=2``: "Ann has the cup. The cup is red. ... Q: What colour is
the thing Ann has?" (facts shuffled). Exactly ``n_candidates`` people and colours per row: every
candidate is named in the text once. **mixed**: half grid, half text.

Why shortcuts stay near chance: answers are balanced (each colour equally often, to within one row);
every candidate colour is in the image (or named in the text) exactly once, so majority-colour,
colour-present and mention-position rules tie; the query's words say nothing about the answer without
the image (or the facts); with region sampling, nor do the moves. :func:`shortcut_baselines` measures the
best such no-reasoning rules on an eval split (``best_cell_per_moves`` chosen on the eval rows, an
in-sample upper bound that selection alone lifts above chance on a few hundred rows;
``best_cell_per_moves_train`` fitted on the train split, what a model can learn from the moves), so a
model's score can be shown beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image

from .data import EVAL_COLUMNS, TRAIN_COLUMNS, load_rows, resolve_media
from .ranking import hit_at_k, ndcg_at_k, pad_scores
from .world import PALETTE as WORLD_PALETTE

PALETTE = {  # name -> RGB: nine colours far apart in RGB
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 225, 40), "green": (40, 170, 60),
    "blue": (40, 70, 220), "purple": (130, 50, 180), "pink": (250, 140, 200), "black": (10, 10, 10),
    "white": (250, 250, 250),
}
COLOURS = tuple(PALETTE)
GRID = 3  # cells per side
CELL = 28  # pixels per cell side: 2x2 patches of 14 px = one merged visual token
MOVES = {"right": (0, 1), "left": (0, -1), "up": (-1, 0), "down": (1, 0)}
OPPOSITE = {"right": "left", "left": "right", "up": "down", "down": "up"}
RELATION = {"right": "right of", "left": "left of", "up": "above", "down": "below"}
NAMES = ("Ann", "Bob", "Cal", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lee")
THINGS = ("cat", "dog", "cup", "hat", "box", "pen", "key", "bag", "car", "map")
TASKS = ("grid", "text", "mixed")
ANCHORS = ("colour", "position")  # how a grid question names its start cell
SAMPLINGS = ("legacy", "region")  # how grid rows draw the moves, the answer cell and the negatives


# ---------------------------------------------------------------------------------------- grid task

def _grid_paths(hops: int, grid: int = GRID) -> dict[tuple[int, int], list[tuple[tuple[int, int], tuple[str, ...]]]]:
    """End cell -> every (start cell, moves) with ``hops`` moves ending there that stays on the grid
    and never steps back."""
    paths = {}
    for cell, moves in product(product(range(grid), repeat=2), product(MOVES, repeat=hops)):
        if any(OPPOSITE[a] == b for a, b in zip(moves, moves[1:])):
            continue
        walk = _walk(cell, moves)
        if all(0 <= r < grid and 0 <= c < grid for r, c in walk):
            paths.setdefault(walk[-1], []).append((cell, moves))
    return paths


def _walk(cell, moves) -> list[tuple[int, int]]:
    visited = [cell]
    for move in moves:
        dr, dc = MOVES[move]
        visited.append((visited[-1][0] + dr, visited[-1][1] + dc))
    return visited


def _at(cell) -> str:
    return f"row {cell[0] + 1} column {cell[1] + 1}"


def _move_regions(hops: int, grid: int = GRID) -> list[tuple[tuple[str, ...], list[tuple[int, int]]]]:
    """Every sequence of ``hops`` moves that fits on the grid and never steps back, with its region: the
    cells where it can end (row-major). Given the moves, the answer can only be in the region."""
    regions: dict[tuple[str, ...], list[tuple[int, int]]] = {}
    for end, options in sorted(_grid_paths(hops, grid).items()):
        for _, moves in options:
            regions.setdefault(moves, []).append(end)
    return sorted(regions.items())


def _region_capacity(hops: int, grid: int = GRID) -> tuple[int, tuple[str, ...]]:
    """The fewest negative colours region sampling can draw for any row, and the moves that set it: the region's
    cells other than the answer and, where it lies in the region, the anchor (-1 when no moves fit)."""
    worst = (-1, ())
    for moves, region in _move_regions(hops, grid):
        for end in region:
            free = len(region) - 1 - (_start(end, moves) in region)
            if worst[0] < 0 or free < worst[0]:
                worst = (free, moves)
    return worst


def _start(end, moves) -> tuple[int, int]:
    """The cell that ``moves`` lead from to ``end``."""
    return end[0] - sum(MOVES[m][0] for m in moves), end[1] - sum(MOVES[m][1] for m in moves)


def grid_sample(rng: np.random.Generator, answer: str, hops: int, paths, size: int = GRID,
                colours: tuple[str, ...] = COLOURS, anchor: str = "colour") -> dict:
    """One grid question whose answer is ``answer``, legacy sampling (``paths``: :func:`_grid_paths`): the
    answer cell uniform over the grid, then a path to it; negatives from every colour in the image.
    The ``size`` x ``size`` grid shows ``answer`` and ``size**2 - 1`` other colours drawn from ``colours``."""
    ends = sorted(paths)
    options = paths[ends[rng.integers(len(ends))]]
    start, moves = options[rng.integers(len(options))]
    return _grid_question(rng, answer, hops, start, moves, size, colours, anchor=anchor)


def grid_sample_region(rng: np.random.Generator, answer: str, hops: int, regions, size: int = GRID,
                       colours: tuple[str, ...] = COLOURS, anchor: str = "colour") -> dict:
    """One grid question whose answer is ``answer``, region sampling (``regions``: :func:`_move_regions`): the
    moves uniform over the sequences that fit, the answer cell uniform over where they can end, the start
    behind it; negatives only from colours in that region, so the moves alone say nothing about the answer."""
    moves, region = regions[rng.integers(len(regions))]
    end = region[rng.integers(len(region))]
    return _grid_question(rng, answer, hops, _start(end, moves), moves, size, colours, region, anchor)


def _grid_question(rng, answer, hops, start, moves, size, colours, region=None, anchor="colour") -> dict:
    """The cell colours, query, trace and negatives of the walk ``moves`` from ``start``; ``region``: the
    cells the negatives come from (None: every cell, legacy). ``anchor``: the start is named by its colour
    ("the navy cell": finding it is the first step) or by its position ("row 2, column 3": no search)."""
    cells = _walk(start, moves)
    end = cells[-1]
    others = [c for c in colours if c != answer]
    order = [others[i] for i in rng.permutation(len(others))[:size * size - 1]]
    grid = {end: answer}
    for cell in product(range(size), repeat=2):
        if cell != end:
            grid[cell] = order.pop()
    shown = [[grid[(r, c)] for c in range(size)] for r in range(size)]
    if hops == 0:
        question = f"What colour is the cell in row {end[0] + 1}, column {end[1] + 1}?"
        cot = f"{_at(end)} is {answer}."
        named, hard = None, grid[cells[-1][::-1]] if end[0] != end[1] else grid[((end[0] + 1) % size, end[1])]
    else:
        if anchor == "position":  # the world's wording (tte_flash.world): "row 2, column 3"; trace "start at ..."
            place, opening, named = f"row {start[0] + 1}, column {start[1] + 1}", f"start at {_at(start)}.", None
        else:
            named = grid[start]
            place, opening = f"the {named} cell", f"the {named} cell is at {_at(start)}."
        if hops == 1:
            question = f"What colour is the cell {RELATION[moves[0]]} {place}?"
            steps = f"{RELATION[moves[0]]} it is {_at(end)}."
        else:
            question = f"Start at {place}, move {moves[0]}, then {moves[1]}. What colour is that cell?"
            steps = " ".join(f"{m}: {_at(c)}." for m, c in zip(moves, cells[1:]))
        cot = f"{opening} {steps} that cell is {answer}."
        # hard negative: one step short (two hops) or a different step from the anchor (one hop)
        alternatives = [c for c in _neighbours(start, size) if c != end]
        if region is None:
            hard = grid[cells[1]] if hops == 2 else grid[alternatives[rng.integers(len(alternatives))]]
        else:
            # only cells of the region: a negative outside it would teach that the moves alone rule it out.
            # The one-step-short cell (two hops) or a neighbour of the anchor in the region (one hop); where
            # there is none, another region cell (neither the answer nor the anchor) at random
            others_in_region = [c for c in region if c not in (start, end)]
            meaningful = [c for c in ([cells[1]] if hops == 2 else alternatives) if c in others_in_region]
            choices = meaningful or others_in_region
            hard = grid[choices[rng.integers(len(choices))]]
    if region is None:
        in_image = {c for row in shown for c in row}
        pool = [c for c in colours if c in in_image and c not in (answer, named)]  # candidates: colours in the image
    else:
        pool = [grid[c] for c in region if c not in (start, end)]  # candidates: colours where the moves can end
    return {"task": "grid", "hops": hops, "question": question, "cot": cot, "answer": answer, "pool": pool,
            "hard_negative": hard, "grid": shown}


def _neighbours(cell, size: int = GRID) -> list[tuple[int, int]]:
    cells = [(cell[0] + dr, cell[1] + dc) for dr, dc in MOVES.values()]
    return [c for c in cells if 0 <= c[0] < size and 0 <= c[1] < size]


def render_grid(colours: list[list[str]]) -> Image.Image:
    """The grid as an RGB image, ``CELL`` px per cell (colours of the world palette, a superset of PALETTE)."""
    rgb = np.array([[WORLD_PALETTE[c] for c in row] for row in colours], dtype=np.uint8)  # (G, G, 3)
    return Image.fromarray(np.repeat(np.repeat(rgb, CELL, axis=0), CELL, axis=1))


# ---------------------------------------------------------------------------------------- text task

def text_sample(rng: np.random.Generator, answer: str, hops: int, n_people: int,
                colours: tuple[str, ...] = COLOURS) -> dict:
    """Facts about ``n_people`` people, a question whose answer is ``answer``, the trace, negatives."""
    others = [c for c in colours if c != answer]
    colours = [answer] + [others[i] for i in rng.permutation(len(others))[:n_people - 1]]
    people = [NAMES[i] for i in rng.permutation(len(NAMES))[:n_people]]
    asked = people[0]  # owns the answer colour
    if hops <= 1:
        thing = THINGS[rng.integers(len(THINGS))]
        facts = [f"{p}'s {thing} is {c}." for p, c in zip(people, colours)]
        question = f"Q: What colour is {asked}'s {thing}?"
        cot = f"{asked}'s {thing} is {answer}."
    else:
        things = [THINGS[i] for i in rng.permutation(len(THINGS))[:n_people]]
        facts = [f"{p} has the {t}." for p, t in zip(people, things)]
        facts += [f"The {t} is {c}." for t, c in zip(things, colours)]
        question = f"Q: What colour is the thing {asked} has?"
        cot = f"{asked} has the {things[0]}. the {things[0]} is {answer}."
    facts = [facts[i] for i in rng.permutation(len(facts))]
    pool = colours[1:]
    return {"task": "text", "hops": hops, "question": " ".join(facts) + " " + question, "cot": cot,
            "answer": answer, "pool": pool, "hard_negative": pool[rng.integers(len(pool))], "grid": None}


# ---------------------------------------------------------------------------------------- generation

def balanced_answers(rng: np.random.Generator, n: int, colours: tuple[str, ...] = COLOURS) -> list[str]:
    """``n`` answers, each colour equally often to within one, in random order."""
    blocks = [rng.permutation(len(colours)) for _ in range(-(-n // len(colours)))]
    picks = np.concatenate(blocks)[:n] if blocks else np.zeros(0, dtype=int)
    return [colours[i] for i in rng.permutation(picks)]


def palette_colours(palette: str) -> tuple[str, ...]:
    """The colour names of a palette: ``basic`` (the 9 of :data:`PALETTE`) or ``world`` (the 20 of
    ``tte_flash.world``: the basic nine and eleven more), or a comma-separated list of world colours."""
    if palette == "basic":
        return COLOURS
    if palette == "world":
        return tuple(WORLD_PALETTE)
    names = tuple(c.strip() for c in palette.split(",") if c.strip())
    unknown = [c for c in names if c not in WORLD_PALETTE]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"palette must be 'basic', 'world' or distinct colours among {list(WORLD_PALETTE)}; "
                         f"got {palette!r}")
    return names


def _check_args(task, hops, n_candidates, grid=GRID, colours=COLOURS, sampling="legacy", anchor="colour"):
    if anchor not in ANCHORS:
        raise ValueError(f"unknown anchor {anchor!r}; choose one of {ANCHORS}")
    if anchor != "colour" and (task == "text" or hops == 0):
        raise ValueError(f"anchor={anchor!r} names the start of a grid walk: it needs task grid or mixed and hops 1 or 2")
    if not 2 <= grid <= 5:
        raise ValueError(f"grid must be 2 to 5 cells per side, got {grid}")
    if task != "text" and grid * grid > len(colours):
        raise ValueError(f"a {grid}x{grid} grid shows {grid * grid} distinct colours but the palette has "
                         f"{len(colours)} (the world palette has {len(WORLD_PALETTE)}); use a larger palette or a smaller grid")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if hops not in (0, 1, 2):
        raise ValueError(f"hops must be 0, 1 or 2, got {hops}")
    if task != "grid" and hops == 0:
        raise ValueError("hops=0 (direct lookup) exists for the grid task only")
    shown = min(len(colours), grid * grid) if task != "text" else len(colours)
    most = shown - (1 if task != "text" and hops > 0 else 0)
    if not 2 <= n_candidates <= most:
        raise ValueError(f"n_candidates must be in [2, {most}] for task={task}, hops={hops}, grid={grid} "
                         f"(candidates are colours shown in the image or named in the facts)")
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; choose one of {SAMPLINGS}")
    if sampling == "region":
        _check_region(task, hops, n_candidates, grid)


def _check_region(task, hops, n_candidates, grid):
    if task == "text":
        raise ValueError("sampling='region' draws grid rows; task='text' has none (use 'legacy')")
    free, moves = _region_capacity(hops, grid)
    if n_candidates - 1 > free:
        where = f"the moves {', '.join(moves)!r} leave" if moves else "the grid leaves"
        fits = f"at most {free + 1} candidates" if free >= 1 else "no grid question here"
        raise ValueError(f"sampling='region' draws the n_candidates - 1 = {n_candidates - 1} negatives from colours of "
                         f"the cells where the moves can end, never the answer's or the anchor's; on a {grid}x{grid} "
                         f"grid with {hops} hop(s) {where} only {free} such cells in some rows, so {fits}: "
                         f"use fewer candidates or a larger grid")


def _samples(rng, n, task, hops, n_candidates, grid=GRID, colours=COLOURS, sampling="legacy",
             anchor="colour") -> list[dict]:
    tasks = ["grid" if (task == "grid" or (task == "mixed" and i % 2 == 0)) else "text" for i in range(n)]
    sample, plan = (grid_sample, _grid_paths(hops, grid)) if sampling == "legacy" else \
        (grid_sample_region, _move_regions(hops, grid))
    answers = {t: iter(balanced_answers(rng, tasks.count(t), colours)) for t in ("grid", "text")}
    return [sample(rng, next(answers[t]), hops, plan, grid, colours, anchor) if t == "grid"
            else text_sample(rng, next(answers[t]), hops, n_candidates, colours) for t in tasks]


def _write_split(out: Path, split: str, samples: list[dict], rng, n_candidates: int, hard_negatives: bool):
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(samples):
        image = ""
        if s["grid"] is not None:
            image = f"images/{split}/{i:06d}.png"
            render_grid(s["grid"]).save(out / image, compress_level=1)
        query = f"<|image_1|>\n{s['question']}" if image else s["question"]
        meta = {"id": f"{split}-{i:06d}", "task": s["task"], "hops": s["hops"]}
        if split == "train":
            row = {"qry": query, "qry_image_path": image, "pos_text": s["answer"], "pos_image_path": "",
                   "qry_cot": s["cot"]}
            if hard_negatives:
                row.update(neg_text=s["hard_negative"], neg_image_path="")
        else:
            negatives = [s["pool"][j] for j in rng.permutation(len(s["pool"]))[:n_candidates - 1]]
            row = {"qry_text": query, "qry_img_path": image, "tgt_text": [s["answer"], *negatives],
                   "tgt_img_path": [""] * n_candidates, "qry_cot": s["cot"]}
        rows.append({**row, **meta})
    path = out / f"{split}.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return path, rows


def generate(output_dir, n_train: int, n_eval: int, seed: int = 0, hops: int = 1, n_candidates: int = 8,
             task: str = "grid", hard_negatives: bool = True, grid: int = GRID, palette: str = "basic",
             sampling: str = "legacy", anchor: str = "colour") -> dict:
    """Write a synthetic train/eval set to ``output_dir``; return ``{"paths": {...}, "stats": {...}}``.

    Deterministic by ``seed``; the eval split does not depend on ``n_train`` (separate random streams).
    ``stats`` holds the answer counts and the eval split's shortcut baselines (hit@1), including the ones
    fitted on the train split. ``sampling``: ``legacy`` (the default; data sets regenerate byte for byte) or
    ``region`` (grid rows whose moves say nothing about the answer; see the module docstring). ``anchor``:
    the walk starts at a named colour (``colour``, the default: locating it is the first step) or at a named
    position (``position``: "right of row 2, column 3", no search; the trace starts "start at row 2 column 3.").
    """
    colours = palette_colours(palette)
    _check_args(task, hops, n_candidates, grid, colours, sampling, anchor)
    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for stream, (split, n) in enumerate((("train", n_train), ("eval", n_eval))):
        rng = np.random.default_rng([seed, stream])
        samples = _samples(rng, n, task, hops, n_candidates, grid, colours, sampling, anchor)
        splits[split] = _write_split(out, split, samples, rng, n_candidates, hard_negatives)
    name = f"synthetic-{task}-{hops}hop" + (f"-{grid}x{grid}" if grid != GRID else "") + \
        (f"-{palette}" if palette != "basic" else "") + (f"-{sampling}" if sampling != "legacy" else "") + \
        ("-position-anchor" if anchor != "colour" else "")
    shortcuts = shortcut_baselines(splits["eval"][1], out, train_rows=splits["train"][1]) if n_eval else {}
    stats = {"n_train": n_train, "n_eval": n_eval, "chance_hit@1": 1 / n_candidates,
             "train_answers": dict(Counter(r["pos_text"] for r in splits["train"][1])),
             "eval_answers": dict(Counter(r["tgt_text"][0] for r in splits["eval"][1])),
             "shortcuts_hit@1": shortcuts, "seconds": round(time.perf_counter() - start, 3)}
    meta = {"name": name, "task": task, "hops": hops, "n_candidates": n_candidates, "seed": seed,
            "hard_negatives": hard_negatives, "palette": {c: WORLD_PALETTE[c] for c in colours}, "grid": grid, "cell_pixels": CELL,
            "generator": "tte_flash.synthetic", **({"sampling": sampling} if sampling != "legacy" else {}),
            **({"anchor": anchor} if anchor != "colour" else {}), **stats}
    paths = {"train": str(splits["train"][0]), "eval": str(splits["eval"][0]), "images": str(out / "images"),
             "meta": str(out / "meta.json"), "readme": str(out / "README.md"), "image_root": str(out)}
    Path(paths["meta"]).write_text(json.dumps(meta, indent=2) + "\n")
    Path(paths["readme"]).write_text(_readme(meta))
    return {"paths": paths, "stats": stats}


def _readme(meta: dict) -> str:
    shortcut_lines = "\n".join(f"| {k} | {v:.4f} |" for k, v in meta["shortcuts_hit@1"].items())
    return f"""# {meta['name']}

Generated by `python -m tte_flash.synthetic --task {meta['task']} --hops {meta['hops']} \
--n_candidates {meta['n_candidates']} --seed {meta['seed']}{_readme_options(meta)}` ({meta['n_train']} train rows, \
{meta['n_eval']} eval rows).

{'**grid**' + __doc__.split('**grid**', 1)[1]}
Files: `train.jsonl` (MMEB-train columns `qry`, `qry_image_path`, `pos_text`, `pos_image_path`, `neg_text`,
`neg_image_path`, plus `qry_cot`), `eval.jsonl` (`qry_text`, `qry_img_path`, `tgt_text`, `tgt_img_path`,
positive first), `images/` (paths are relative to this folder: `--image_root {{this folder}}`).

## No-reasoning shortcuts on the eval split (hit@1; chance {meta['chance_hit@1']:.4f})

| shortcut | hit@1 |
|---|---|
{shortcut_lines}
"""


def _readme_options(meta: dict) -> str:
    """The non-default CLI options of a data set, as its README's command spells them."""
    palette = meta["palette"]
    names = {COLOURS: "basic", tuple(WORLD_PALETTE): "world"}.get(tuple(palette), ",".join(palette))
    options = {f"--grid {meta['grid']}": meta["grid"] != GRID, f"--palette {names}": names != "basic",
               f"--sampling {meta.get('sampling')}": "sampling" in meta, f"--anchor {meta.get('anchor')}": "anchor" in meta,
               "--no_hard_negatives": not meta["hard_negatives"]}
    return "".join(f" {option}" for option, shown in options.items() if shown)


# ---------------------------------------------------------------------------------------- shortcuts

def shortcut_baselines(rows_or_path, image_root=None, train_rows=None) -> dict[str, float]:
    """Hit@1 of no-reasoning rules on MMEB-eval rows (a list or a JSONL/Parquet path; ``image_root``
    defaults to the file's folder), ties broken at random (expected value), so a model's score can
    be shown beside the best of them. See :func:`shortcut_metrics` for the rules."""
    return {name: m["hit@1"] for name, m in shortcut_metrics(rows_or_path, image_root, train_rows=train_rows).items()}


def shortcut_metrics(rows_or_path, image_root=None, k: int = 5, train_rows=None) -> dict[str, dict[str, float]]:
    """``{rule: {"hit@1", "ndcg@5"}}`` for each no-reasoning rule that applies to the rows:

    * ``random``: chance;
    * ``most_frequent_answer``: prefer the candidate most often the positive in these rows (an
      oracle prior, so an upper bound for any answer-prior rule); ``answer_prior``: prefer the
      candidate with the highest positive rate (times positive / times a candidate);
    * ``named_in_query`` / ``not_named_in_query``: prefer (avoid) candidates the query text names;
      ``first_named`` / ``last_named``: prefer the candidate named first (last) in the query;
    * with a query image and colour-name candidates: ``majority_colour`` / ``minority_colour`` (the
      candidate colour covering the most / the fewest pixels, among colours present),
      ``present_in_image``, ``best_fixed_cell`` (the colour of one fixed grid cell; the best cell), and
      for grid moves ``best_cell_per_moves``: the colour of the best fixed cell for each sequence of moves in
      the query ("left of", "up", "down", ...), chosen on these rows: the moves alone, without the anchor
      colour, confine where the answer can be on a small grid (an in-sample upper bound, as ``best_fixed_cell``;
      with few rows per sequence of moves it is above chance even where the moves say nothing);
    * with ``train_rows`` (MMEB-train rows or their JSONL/Parquet path, images under the same ``image_root``;
      :func:`generate` passes its train split): ``best_cell_per_moves_train``, the same cell per sequence of
      moves chosen on the train rows' positives and scored on these rows: out of sample, so no selection bias,
      what a model could learn from the moves alone (a sequence of moves absent from train: all candidates tie).
    """
    rows, image_root = _eval_rows(rows_or_path, image_root)
    if isinstance(train_rows, (str, os.PathLike)):
        train_rows = load_rows(train_rows, TRAIN_COLUMNS)
    rules = _shortcut_scores(rows, image_root, train_rows or [])
    return {name: {"hit@1": hit_at_k(pad_scores(s), 1, ties="expected"),
                   f"ndcg@{k}": ndcg_at_k(pad_scores(s), k, ties="expected")} for name, s in rules.items()}


def shortcut_summary(rows_or_path, image_root=None) -> dict:
    """``{"shortcuts": shortcut_metrics(...), "shortcut_best": {metric: value}, "shortcut_best_name":
    {metric: rule}}``: every rule and, per metric, the best of them (what an evaluation reports beside
    a model's score)."""
    shortcuts = shortcut_metrics(rows_or_path, image_root)
    best = {metric: max(shortcuts, key=lambda name: shortcuts[name][metric]) for metric in ("hit@1", "ndcg@5")}
    return {"shortcuts": shortcuts, "shortcut_best": {m: shortcuts[n][m] for m, n in best.items()},
            "shortcut_best_name": best}


def _eval_rows(rows_or_path, image_root):
    if isinstance(rows_or_path, (str, os.PathLike)):
        image_root = Path(rows_or_path).parent if image_root is None else image_root
        return load_rows(rows_or_path, EVAL_COLUMNS), image_root
    rows = list(rows_or_path)
    if not rows:
        raise ValueError("no evaluation rows")
    return rows, image_root


def _candidates(row) -> list[str]:
    texts = row.get("tgt_text")
    texts = [texts] if isinstance(texts, str) else list(texts or [])
    return [(t or "").strip() for t in texts]


def _shortcut_scores(rows, image_root, train_rows=()) -> dict[str, list[list[float]]]:
    cands = [_candidates(r) for r in rows]
    positives = Counter(c[0] for c in cands)
    appearances = Counter(t for c in cands for t in set(c))
    rules = {"random": [[0.0] * len(c) for c in cands],
             "most_frequent_answer": [[float(positives[t]) for t in c] for c in cands],
             "answer_prior": [[positives[t] / appearances[t] for t in c] for c in cands]}
    queries = [(r.get("qry_text") or r.get("qry") or "").lower() for r in rows]
    first = [[_mention(q, t, last=False) for t in c] for q, c in zip(queries, cands)]
    last = [[_mention(q, t, last=True) for t in c] for q, c in zip(queries, cands)]
    if any(p >= 0 for row in first for p in row):
        rules["named_in_query"] = [[float(p >= 0) for p in row] for row in first]
        rules["not_named_in_query"] = [[-float(p >= 0) for p in row] for row in first]
        rules["first_named"] = [[-p if p >= 0 else -1e9 for p in row] for row in first]
        rules["last_named"] = [[p if p >= 0 else -1e9 for p in row] for row in last]
    if any(t.lower() in WORLD_PALETTE for c in cands for t in c):
        rules.update(_colour_rules(rows, cands, image_root, train_rows))
    return rules


def _mention(text: str, candidate: str, last: bool) -> float:
    """Character offset of the first/last whole-word mention of ``candidate`` in ``text`` (-1: none)."""
    if not candidate:
        return -1.0
    hits = [m.start() for m in re.finditer(rf"\b{re.escape(candidate.lower())}\b", text)]
    return float(hits[-1] if last else hits[0]) if hits else -1.0


def _colour_rules(rows, cands, image_root, train_rows=()) -> dict[str, list[list[float]]]:
    fractions, cell_colours = zip(*(_row_colours(row, image_root) for row in rows))
    if not any(fractions):
        return {}
    rules = {
        "majority_colour": [[f.get(t.lower(), 0.0) for t in c] for f, c in zip(fractions, cands)],
        "minority_colour": [[-f[t.lower()] if f.get(t.lower(), 0) > 0 else -2.0 for t in c]
                            for f, c in zip(fractions, cands)],
        "present_in_image": [[float(f.get(t.lower(), 0) > 0) for t in c] for f, c in zip(fractions, cands)],
    }
    best = None
    for cell in range(max(len(c) for c in cell_colours)):
        scores = [[float(cell < len(cells) and cells[cell] == t.lower()) for t in c] for cells, c in zip(cell_colours, cands)]
        wins = sum(s[0] > 0 for s in scores)
        if best is None or wins > best[0]:
            best = (wins, scores)
    rules["best_fixed_cell"] = best[1]
    moves = [_moves(row) for row in rows]
    if any(moves):
        positives = [c[0].lower() if c else None for c in cands]
        best = _best_cell_per_group(moves, cell_colours, positives)
        rules["best_cell_per_moves"] = _score_by_cell(best, moves, cell_colours, cands)
        if train_rows:
            train_cells = [_cell_colours(resolve_media(image_root, row.get("qry_image_path"))) for row in train_rows]
            train_positives = [(row.get("pos_text") or "").strip().lower() for row in train_rows]
            best = _best_cell_per_group([_moves(row) for row in train_rows], train_cells, train_positives)
            rules["best_cell_per_moves_train"] = _score_by_cell(best, moves, cell_colours, cands)
    return rules


MOVE_WORDS = r"right of|left of|above|below|\bright\b|\bleft\b|\bup\b|\bdown\b"


def _moves(row) -> tuple[str, ...]:
    """The move words of a row's query, in order (eval or train columns)."""
    return tuple(re.findall(MOVE_WORDS, (row.get("qry_text") or row.get("qry") or "").lower()))


def _row_colours(row, image_root) -> tuple[dict[str, float], list[str]]:
    path = resolve_media(image_root, row.get("qry_img_path") or row.get("qry_image_path"))
    return _colour_fractions(path) if path else ({}, [])


def _best_cell_per_group(groups, cell_colours, positives) -> dict[tuple, int | None]:
    """Per group (a sequence of moves), the grid cell whose colour is most often the positive (lowest index
    on ties; None for a group without images)."""
    wins: dict[tuple, Counter] = {}
    for group, cells, positive in zip(groups, cell_colours, positives):
        counter = wins.setdefault(group, Counter())
        for index, colour in enumerate(cells):
            counter[index] += positive is not None and colour == positive
    return {group: min(counter, key=lambda i: (-counter[i], i)) if counter else None for group, counter in wins.items()}


def _score_by_cell(best, groups, cell_colours, cands) -> list[list[float]]:
    """Every row scores its candidates by the colour of its group's cell (1 for that colour, else 0)."""
    return [[float(best.get(g) is not None and best[g] < len(cells) and cells[best[g]] == t.lower()) for t in c]
            for g, cells, c in zip(groups, cell_colours, cands)]


def _cell_colours(path) -> list[str]:
    """The nearest palette colour at each grid cell's centre, row-major (the centres of
    :func:`_colour_fractions` without the pixel shares: ~8x faster, for fitting on a train split)."""
    if not path:
        return []
    with Image.open(path) as img:
        centres = np.asarray(img.convert("RGB"), dtype=np.float32)[CELL // 2::CELL, CELL // 2::CELL]  # (G, G, 3)
    palette = np.array(list(WORLD_PALETTE.values()), dtype=np.float32)  # (C, 3)
    nearest = ((centres.reshape(-1, 1, 3) - palette) ** 2).sum(-1).argmin(-1)  # (G*G,)
    names = tuple(WORLD_PALETTE)
    return [names[i] for i in nearest]


def _colour_fractions(path) -> tuple[dict[str, float], list[str]]:
    """Share of pixels nearest each palette colour, and the nearest colour at each grid cell's centre."""
    with Image.open(path) as img:
        rows, cols = max(1, img.height // CELL), max(1, img.width // CELL)  # cells of CELL px
        small = np.asarray(img.convert("RGB").resize((cols * 8, rows * 8), Image.NEAREST), dtype=np.float32)
    names = tuple(WORLD_PALETTE)
    palette = np.array(list(WORLD_PALETTE.values()), dtype=np.float32)  # (C, 3)
    nearest = ((small[:, :, None, :] - palette) ** 2).sum(-1).argmin(-1)  # (H, W)
    counts = np.bincount(nearest.ravel(), minlength=len(palette)) / nearest.size
    centres = [names[nearest[r * 8 + 4, c * 8 + 4]] for r in range(rows) for c in range(cols)]
    return {name: float(v) for name, v in zip(names, counts) if v > 0}, centres


# ---------------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tte_flash.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", "--output-dir", required=True)
    parser.add_argument("--n_train", "--n-train", type=int, default=2000)
    parser.add_argument("--n_eval", "--n-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hops", type=int, default=1, choices=(0, 1, 2), help="0 (grid lookup), 1 or 2 reasoning hops")
    parser.add_argument("--n_candidates", "--n-candidates", type=int, default=8)
    parser.add_argument("--task", default="grid", choices=TASKS)
    parser.add_argument("--grid", type=int, default=GRID, help="cells per side of the grid images (2-5)")
    parser.add_argument("--palette", default="basic",
                        help="basic (9 colours), world (20: the world tiny-instruct was pretrained on) or a "
                             "comma-separated list of world colours")
    parser.add_argument("--sampling", default="legacy", choices=SAMPLINGS,
                        help="grid rows: legacy (answer cell uniform over the grid, then a path to it; the moves alone "
                             "confine the answer) or region (moves first, the answer cell uniform over where they can "
                             "end, negatives from that region only)")
    parser.add_argument("--anchor", default="colour", choices=ANCHORS,
                        help="grid walks start at a named colour (colour: 'right of the navy cell', finding it is the "
                             "first step) or at a named position (position: 'right of row 2, column 3')")
    parser.add_argument("--no_hard_negatives", "--no-hard-negatives", action="store_true",
                        help="train rows without neg_text")
    args = parser.parse_args(argv)
    try:
        result = generate(args.output_dir, args.n_train, args.n_eval, seed=args.seed, hops=args.hops,
                          n_candidates=args.n_candidates, task=args.task, hard_negatives=not args.no_hard_negatives,
                          grid=args.grid, palette=args.palette, sampling=args.sampling,
                          anchor=args.anchor)
    except ValueError as err:
        print(f"tte_flash.synthetic: error: {err}", file=sys.stderr)
        return 2
    stats = result["stats"]
    print(f"wrote {stats['n_train']} train and {stats['n_eval']} eval rows to {args.output_dir} "
          f"in {stats['seconds']:.1f}s ({args.task}, {args.hops} hop(s), {args.n_candidates} candidates, "
          f"{args.sampling} sampling)")
    print(f"no-reasoning shortcuts on eval, hit@1 (chance {stats['chance_hit@1']:.3f}):")
    for name, value in sorted(stats["shortcuts_hit@1"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:22s} {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
