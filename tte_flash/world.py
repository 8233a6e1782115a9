"""The synthetic "world" the CPU backbone ``tiny-instruct`` is pretrained on (DESIGN.md §10).

A world sample is ``(image or None, prompt, answer)``; the pretraining loss is next-token NLL on the
answer given ``[image][prompt]``. The world is broader than any evaluation task of
:mod:`tte_flash.synthetic`, so that TTE training starts from a backbone that already reads:

* grid images of 2x2 to 5x5 cells (rectangular too), 28 px a cell (one merged visual token each),
  coloured from :data:`PALETTE` (20 named colours; the 9 of ``tte_flash.synthetic`` among them);
* ``cell``: "What colour is the cell in row 2, column 3?" -> "row 2 column 3 is blue." (several wordings;
  with "Answer with one word." -> "blue."); ``cells``: 2-5 positions in one question, one answer each;
* ``locate``: "Where is the red cell?" -> "the red cell is at row 1 column 2.";
* ``describe``: "Describe row 2." / "Describe the grid." -> "row 2: red, blue, green.";
* ``move``: relative moves with spelled-out traces, 0-3 hops, from a coloured cell or a position
  ("the red cell is at row 1 column 2. right of it is row 1 column 3. that cell is blue.") - the trace
  formats of ``tte_flash.synthetic``;
* ``count``: "How many red cells are there?" -> "the red cells are at row 1 column 1, row 3 column 2. that is 2.";
* ``text``: facts, then a 1- or 2-hop question ("Ann's hat is red. ... Q: What colour is Bob's hat?"),
  half of the 1-hop ones with 2-4 questions.

Tasks added for the ``tiny-reasoner`` preset (not in the default :data:`TASK_WEIGHTS`, which is unchanged):

* ``move_short``: a 1- or 2-hop move answered in one word, no trace ("What colour is the cell left of the
  navy cell? Answer with one word." -> "purple.");
* ``text_short``: a 1- or 2-hop text question answered in one word ("... Q: What colour is the thing Ann
  has? Answer with one word." -> "red.").

``World(max_hops=1)`` caps the hops of ``move``, ``move_short``, ``text`` and ``text_short`` (a curriculum
stage); ``max_hops=None`` (the default) leaves every task exactly as before, draw for draw.

Everything is drawn from one ``numpy`` generator, so a seed fixes the stream.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

PALETTE = {  # name -> RGB. The first nine are tte_flash.synthetic's palette, with the same values.
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 225, 40), "green": (40, 170, 60),
    "blue": (40, 70, 220), "purple": (130, 50, 180), "pink": (250, 140, 200), "black": (10, 10, 10),
    "white": (250, 250, 250), "brown": (120, 70, 30), "grey": (128, 128, 128), "cyan": (40, 220, 230),
    "lime": (170, 250, 60), "navy": (20, 20, 110), "teal": (20, 120, 120), "maroon": (110, 10, 40),
    "olive": (120, 120, 20), "magenta": (230, 30, 230), "beige": (230, 210, 160), "gold": (200, 160, 50),
}
COLOURS = tuple(PALETTE)
CELL = 28  # pixels per cell side: 2x2 patches of 14 px = one merged visual token
MIN_SIDE, MAX_SIDE = 2, 5
MOVES = {"right": (0, 1), "left": (0, -1), "up": (-1, 0), "down": (1, 0)}
OPPOSITE = {"right": "left", "left": "right", "up": "down", "down": "up"}
RELATION = {"right": "right of", "left": "left of", "up": "above", "down": "below"}
NAMES = ("Ann", "Bob", "Cal", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lee", "Max", "Ned", "Oli",
         "Pam", "Rex", "Sue", "Tom", "Uma")
THINGS = ("cat", "dog", "cup", "hat", "box", "pen", "key", "bag", "car", "map", "ball", "book", "lamp", "sock",
          "ring", "kite")
TASK_WEIGHTS = {"cells": 0.25, "cell": 0.1, "cell_short": 0.05, "locate": 0.05, "describe": 0.1, "move": 0.2,
                "count": 0.05, "text": 0.2}
EXTRA_TASKS = ("move_short", "text_short")  # valid task names beyond TASK_WEIGHTS' keys (tiny-reasoner's mix)
TASKS = tuple(TASK_WEIGHTS) + EXTRA_TASKS
MOVE_HOPS = (0.1, 0.4, 0.35, 0.15)  # the trace task's hop distribution, 0-3 hops
SHORT_HOPS = (0.0, 0.5, 0.5)  # the one-word move task's, 1-2 hops
ONE_WORD = " Answer with one word."

CELL_QUESTIONS = ("What colour is the cell in row {r}, column {c}?", "Which colour is the cell at row {r}, column {c}?",
                  "What is the colour of row {r}, column {c}?", "Name the colour at row {r} column {c}.",
                  "Which colour is in row {r}, column {c}?", "What colour is the square in row {r}, column {c}?")


def render_grid(colours: list[list[str]], palette: dict | None = None, cell: int = CELL) -> Image.Image:
    """A grid of solid cells as an RGB image, ``cell`` px per cell side."""
    palette = PALETTE if palette is None else palette
    rgb = np.array([[palette[c] for c in row] for row in colours], dtype=np.uint8)  # (R, C, 3)
    return Image.fromarray(np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1))


def at(cell) -> str:
    """A 0-based (row, column) as the traces spell it: "row 2 column 3"."""
    return f"row {cell[0] + 1} column {cell[1] + 1}"


def walk(cell, moves) -> list[tuple[int, int]]:
    visited = [tuple(cell)]
    for move in moves:
        dr, dc = MOVES[move]
        visited.append((visited[-1][0] + dr, visited[-1][1] + dc))
    return visited


def move_trace(start_text: str, moves, cells, answer: str) -> str:
    """The trace format of ``tte_flash.synthetic``: one hop "right of it is ...", more "right: ..."."""
    if len(moves) == 1:
        steps = f"{RELATION[moves[0]]} it is {at(cells[1])}."
    else:
        steps = " ".join(f"{m}: {at(c)}." for m, c in zip(moves, cells[1:]))
    return f"{start_text} {steps} that cell is {answer}." if moves else f"{start_text} that cell is {answer}."


class World:
    """An endless stream of world samples: ``World(seed).sample()`` -> dict(image, prompt, answer, task)."""

    def __init__(self, seed: int = 0, colours: tuple[str, ...] = COLOURS, task_weights: dict | None = None,
                 multi_questions: bool = True, max_hops: int | None = None):
        self.rng = np.random.default_rng(seed)
        self.max_hops = max_hops  # None: every task as it always was; 0/1/2: a curriculum stage's cap
        self.multi_questions = multi_questions  # some text samples ask about several people (dense supervision)
        self.colours = tuple(colours)
        weights = task_weights or TASK_WEIGHTS
        self.tasks, probs = zip(*weights.items())
        self.probs = np.array(probs) / sum(probs)

    def _pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def grid(self, rows: int | None = None, cols: int | None = None, n_colours: int | None = None) -> list[list[str]]:
        """A random grid; ``n_colours`` limits how many distinct colours it draws from (repeats allowed)."""
        rows = rows or int(self.rng.integers(MIN_SIDE, MAX_SIDE + 1))
        cols = cols or (rows if self.rng.random() < 0.6 else int(self.rng.integers(MIN_SIDE, MAX_SIDE + 1)))
        n = rows * cols
        if n_colours is None:
            distinct = n <= len(self.colours) and self.rng.random() < 0.7
            if distinct:
                names = [self.colours[i] for i in self.rng.permutation(len(self.colours))[:n]]
                return [names[r * cols:(r + 1) * cols] for r in range(rows)]
            n_colours = len(self.colours)
        subset = [self.colours[i] for i in self.rng.permutation(len(self.colours))[:n_colours]]
        return [[self._pick(subset) for _ in range(cols)] for _ in range(rows)]

    def sample(self, task: str | None = None) -> dict:
        task = task or self.tasks[int(self.rng.choice(len(self.tasks), p=self.probs))]
        out = getattr(self, f"_{task}")()
        out["task"] = task
        return out

    # -- grid tasks --------------------------------------------------------------------------
    def _grid_sample(self, grid, prompt, answer):
        return {"grid": grid, "image": render_grid(grid), "prompt": prompt, "answer": answer}

    def _cell(self, short: bool = False):
        grid = self.grid()
        r, c = int(self.rng.integers(len(grid))), int(self.rng.integers(len(grid[0])))
        question = self._pick(CELL_QUESTIONS).format(r=r + 1, c=c + 1)
        if short:
            return self._grid_sample(grid, question + " Answer with one word.", f"{grid[r][c]}.")
        return self._grid_sample(grid, question, f"{at((r, c))} is {grid[r][c]}.")

    def _cell_short(self):
        return self._cell(short=True)

    def _cells(self):
        """Several positions of one grid in one question: dense supervision for reading positions."""
        grid = self.grid()
        cells = [(r, c) for r in range(len(grid)) for c in range(len(grid[0]))]
        picks = [cells[i] for i in self.rng.permutation(len(cells))[:int(self.rng.integers(2, 6))]]
        places = "; ".join(f"row {r + 1}, column {c + 1}" for r, c in picks)
        question = self._pick(("What colour is each of these cells: {x}?", "Name the colours of {x}."))
        return self._grid_sample(grid, question.format(x=places), " ".join(f"{at(p)} is {grid[p[0]][p[1]]}." for p in picks))

    def _unique_cells(self, grid) -> dict[str, tuple[int, int]]:
        flat = [colour for row in grid for colour in row]
        return {colour: (r, c) for r, row in enumerate(grid) for c, colour in enumerate(row)
                if flat.count(colour) == 1}

    def _locate(self):
        grid = self.grid()
        unique = self._unique_cells(grid)
        while not unique:
            grid = self.grid()
            unique = self._unique_cells(grid)
        colour = self._pick(sorted(unique))
        question = self._pick(("Where is the {x} cell?", "Which cell is {x}?", "Find the {x} cell."))
        return self._grid_sample(grid, question.format(x=colour), f"the {colour} cell is at {at(unique[colour])}.")

    def _describe(self):
        grid = self.grid()
        rows = [f"row {r + 1}: {', '.join(row)}." for r, row in enumerate(grid)]
        if self.rng.random() < 0.5:
            r = int(self.rng.integers(len(grid)))
            return self._grid_sample(grid, f"Describe row {r + 1}.", rows[r])
        return self._grid_sample(grid, self._pick(("Describe the grid.", "Describe the image.")), " ".join(rows))

    def _hops(self, probs) -> int:
        probs = np.array(probs, dtype=float)
        if self.max_hops is not None:
            probs[self.max_hops + 1:] = 0
            if probs.sum() == 0:  # e.g. the one-word move task at max_hops 0: its easiest level
                probs[min(self.max_hops, len(probs) - 1)] = 1
        return int(self.rng.choice(len(probs), p=probs / probs.sum()))

    def _walk_setup(self, hops: int, from_colour_p: float = 0.75):
        """A grid, a start cell (a uniquely coloured one with probability ``from_colour_p`` where the grid
        has one) and ``hops`` moves that stay on the grid, never undoing the previous one."""
        for _ in range(100):
            grid = self.grid()
            n_rows, n_cols = len(grid), len(grid[0])
            unique = self._unique_cells(grid)
            from_colour = bool(unique) and self.rng.random() < from_colour_p
            start = unique[self._pick(sorted(unique))] if from_colour else \
                (int(self.rng.integers(n_rows)), int(self.rng.integers(n_cols)))
            moves = []
            for _ in range(hops):
                options = [m for m in MOVES if (not moves or OPPOSITE[m] != moves[-1])
                           and 0 <= walk(start, moves + [m])[-1][0] < n_rows
                           and 0 <= walk(start, moves + [m])[-1][1] < n_cols]
                if not options:
                    break
                moves.append(self._pick(options))
            if len(moves) == hops:
                break
        return grid, start, moves, from_colour

    def _move_short(self, hops: int | None = None):
        """A 1- or 2-hop move answered in one word: no trace, the reasoning has to happen inside."""
        hops = self._hops(SHORT_HOPS) if hops is None else hops
        grid, start, moves, from_colour = self._walk_setup(hops, from_colour_p=0.85)
        cells = walk(start, moves)
        answer = grid[cells[-1][0]][cells[-1][1]]
        place = f"the {grid[start[0]][start[1]]} cell" if from_colour else f"row {start[0] + 1}, column {start[1] + 1}"
        if hops == 0:
            question = f"What colour is {place}?"
        elif hops == 1 and self.rng.random() < 0.7:
            question = f"What colour is the cell {RELATION[moves[0]]} {place}?"
        else:
            question = f"Start at {place}, move {', then '.join(moves)}. What colour is that cell?"
        return self._grid_sample(grid, question + ONE_WORD, f"{answer}.")

    def _move(self):
        if self.max_hops is None:
            hops = int(self.rng.choice(4, p=list(MOVE_HOPS)))
        else:
            hops = self._hops(MOVE_HOPS)
        grid, start, moves, from_colour = self._walk_setup(hops)
        cells = walk(start, moves)
        answer = grid[cells[-1][0]][cells[-1][1]]
        anchor = grid[start[0]][start[1]]
        if from_colour:
            place, start_text = f"the {anchor} cell", f"the {anchor} cell is at {at(start)}."
        else:
            place, start_text = f"row {start[0] + 1}, column {start[1] + 1}", f"start at {at(start)}."
        if hops == 0:
            question = f"What colour is {place}?" if not from_colour else f"Which cell is the {anchor} cell?"
            answer_text = f"{start_text} that cell is {answer}."
        elif hops == 1 and self.rng.random() < 0.7:
            question = f"What colour is the cell {RELATION[moves[0]]} {place}?"
            answer_text = move_trace(start_text, moves, cells, answer)
        else:
            path = ", then ".join(moves)
            question = f"Start at {place}, move {path}. What colour is that cell?"
            answer_text = move_trace(start_text, moves, cells, answer)
        return self._grid_sample(grid, question, answer_text)

    def _count(self):
        grid = self.grid(n_colours=int(self.rng.integers(2, 5)))
        present = sorted({c for row in grid for c in row})
        colour = self._pick(present) if self.rng.random() < 0.9 else self._pick(self.colours)
        cells = [(r, c) for r, row in enumerate(grid) for c, x in enumerate(row) if x == colour]
        question = self._pick(("How many {x} cells are there?", "Count the {x} cells.", "How many cells are {x}?"))
        if cells:
            answer = f"the {colour} cells are at {', '.join(at(c) for c in cells)}. that is {len(cells)}."
        else:
            answer = f"there are no {colour} cells. that is 0."
        return self._grid_sample(grid, question.format(x=colour), answer)

    # -- text task ---------------------------------------------------------------------------
    def _text(self):
        n = int(self.rng.integers(2, 9))
        people = [NAMES[i] for i in self.rng.permutation(len(NAMES))[:n]]
        colours = [self.colours[i] for i in self.rng.permutation(len(self.colours))[:n]]
        asked = int(self.rng.integers(n))
        if self.rng.random() < 0.5 or self.max_hops is not None and self.max_hops < 2:
            thing = self._pick(THINGS)
            facts = [f"{p}'s {thing} is {c}." for p, c in zip(people, colours)]
            asked_all = [asked] + ([int(i) for i in self.rng.permutation(n) if i != asked][:int(self.rng.integers(1, 4))]
                                   if self.multi_questions and self.rng.random() < 0.5 else [])
            template = self._pick(("Q: What colour is {p}'s {t}?", "Q: Which colour is {p}'s {t}?"))
            question = " ".join(template.format(p=people[i], t=thing) for i in asked_all)
            answer = " ".join(f"{people[i]}'s {thing} is {colours[i]}." for i in asked_all)
        else:
            things, facts = self._two_hop_facts(people, colours)
            question = self._pick(("Q: What colour is the thing {p} has?", "Q: Which colour is the thing {p} has?"))
            question = question.format(p=people[asked])
            answer = f"{people[asked]} has the {things[asked]}. the {things[asked]} is {colours[asked]}."
        facts = [facts[i] for i in self.rng.permutation(len(facts))]
        return {"grid": None, "image": None, "prompt": " ".join(facts) + " " + question, "answer": answer}

    def _two_hop_facts(self, people, colours):
        """Things for ``people`` and the facts binding person -> thing -> colour (a 2-hop text question)."""
        things = [THINGS[i] for i in self.rng.permutation(len(THINGS))[:len(people)]]
        facts = [f"{p} has the {t}." for p, t in zip(people, things)]
        return things, facts + [f"The {t} is {c}." for t, c in zip(things, colours)]

    def _text_short(self, hops: int | None = None):
        """One text question, 1 hop (a person's thing) or 2 (the thing a person has), answered in one word."""
        hops = self._hops((0.0, 0.5, 0.5)) if hops is None else hops
        n = int(self.rng.integers(2, 9))
        people = [NAMES[i] for i in self.rng.permutation(len(NAMES))[:n]]
        colours = [self.colours[i] for i in self.rng.permutation(len(self.colours))[:n]]
        asked = int(self.rng.integers(n))
        if hops <= 1:
            thing = self._pick(THINGS)
            facts = [f"{p}'s {thing} is {c}." for p, c in zip(people, colours)]
            question = self._pick(("Q: What colour is {p}'s {t}?", "Q: Which colour is {p}'s {t}?"))
            question = question.format(p=people[asked], t=thing)
        else:
            things, facts = self._two_hop_facts(people, colours)
            question = self._pick(("Q: What colour is the thing {p} has?", "Q: Which colour is the thing {p} has?"))
            question = question.format(p=people[asked])
        facts = [facts[i] for i in self.rng.permutation(len(facts))]
        return {"grid": None, "image": None, "prompt": " ".join(facts) + " " + question + ONE_WORD,
                "answer": f"{colours[asked]}."}


def corpus_text(n: int, seed: int = 0, task_weights: dict | None = None, multi_questions: bool = True,
                max_hops: int | None = None) -> list[str]:
    """``n`` world samples as plain text (prompt + answer), for training a tokenizer."""
    world = World(seed, task_weights=task_weights, multi_questions=multi_questions, max_hops=max_hops)
    return [f"{s['prompt']} {s['answer']}" for s in (world.sample() for _ in range(n))]



# ---------------------------------------------------------------------------------------- evaluation

EVAL_KINDS = ("position_3x3", "position_any", "move1_trace", "move2_trace", "count", "text")
# Kinds added for tiny-reasoner (issue 15), measured with ``evaluate_backbone(model, kinds=REASONER_EVAL_KINDS)``:
# locate (right = the reply names the right position), one-word answers to 1- and 2-hop grid moves and text.
NEW_EVAL_KINDS = ("locate", "move1_short", "move2_short", "text1_short", "text2_short")
ALL_EVAL_KINDS = EVAL_KINDS + NEW_EVAL_KINDS  # the index of a kind seeds its stream: append only
REASONER_EVAL_KINDS = ("position_any", "locate", "move1_trace", "move2_trace", "move1_short", "move2_short",
                       "text", "text1_short", "text2_short")


def eval_questions(kind: str, n: int, seed: int = 1_000_003) -> list[dict]:
    """``n`` held-out questions of one kind (a seed stream training never uses), with the answer colour
    (or count) that a correct reply must end with."""
    world = World(seed=[seed, ALL_EVAL_KINDS.index(kind)], multi_questions=False)
    out = []
    while len(out) < n:
        if kind in NEW_EVAL_KINDS:
            hops = 2 if kind.startswith(("move2", "text2")) else 1
            s = world._locate() if kind == "locate" else \
                world._move_short(hops) if kind.startswith("move") else world._text_short(hops)
            s["final"] = s["answer"].rstrip(".").split(" is at ")[-1] if kind == "locate" else last_word(s["answer"])
            out.append(s)
            continue
        if kind in ("position_3x3", "position_any"):
            grid = world.grid(3, 3) if kind == "position_3x3" else world.grid()
            r, c = int(world.rng.integers(len(grid))), int(world.rng.integers(len(grid[0])))
            s = {"image": render_grid(grid), "prompt": f"What colour is the cell in row {r + 1}, column {c + 1}?",
                 "answer": f"{at((r, c))} is {grid[r][c]}."}
        else:
            task = {"move1_trace": "move", "move2_trace": "move", "count": "count", "text": "text"}[kind]
            s = world.sample(task)
            hops = s["answer"].count(":") if task == "move" else 0
            if task == "move" and (s["answer"].startswith("start") or hops != (1 if kind == "move1_trace" else 2)) \
                    and not (kind == "move1_trace" and "it is" in s["answer"]):
                continue
        s["final"] = last_word(s["answer"])
        out.append(s)
    return out


def evaluate_backbone(model, n: int = 100, kinds=EVAL_KINDS, max_new_tokens: int = 64, batch_size: int = 50,
                      think_tokens: int = 0) -> dict:
    """Greedy replies of a backbone (a ``TTEFlashModel``, K=0) to held-out world questions.

    Per kind: the share of replies whose last word is the right answer, and the share equal to the
    reference reply. ``examples`` keeps three (prompt, reply, reference) triples per kind. With
    ``think_tokens`` K > 0 the reply is decoded after K think tokens (``generate_cot``: the layout of
    pause-pretraining and of the TTE COT branch), with at most 8 new tokens (16 for ``locate``)."""
    result = {"examples": {}}
    for kind in kinds:
        questions = eval_questions(kind, n)
        if think_tokens:
            cap = 16 if kind == "locate" else 8  # "the navy cell is at row 2 column 1." is 10 tokens
            replies = model.generate_cot(model_inputs(questions), think_tokens=think_tokens,
                                         max_new_tokens=min(max_new_tokens, cap), batch_size=batch_size)
        else:
            replies = generate_replies(model, questions, max_new_tokens, batch_size)
        finals = [_final(kind, r) for r in replies]
        result[f"{kind}_answer"] = sum(f == q["final"] for f, q in zip(finals, questions)) / n
        result[f"{kind}_exact"] = sum(r.strip() == q["answer"] for r, q in zip(replies, questions)) / n
        result["examples"][kind] = [(q["prompt"], r, q["answer"]) for q, r in zip(questions[:3], replies[:3])]
    return result


def model_inputs(samples) -> list[dict]:
    """World samples as model inputs: the prompt, with its image where there is one."""
    return [{"text": s["prompt"]} if s["image"] is None else {"image": s["image"], "text": s["prompt"]}
            for s in samples]


def generate_replies(model, samples, max_new_tokens: int = 64, batch_size: int = 50) -> list[str]:
    """Greedy replies (explicit generation, K=0, KV cache) to world samples."""
    return model.generate_traces(model_inputs(samples), max_new_tokens=max_new_tokens, batch_size=batch_size)


def _final(kind: str, reply: str) -> str:
    """What a reply answers: its last word, or for ``locate`` the position it ends with ("row 1 column 2")."""
    if kind == "locate":
        return " ".join(reply.strip().rstrip(".").split()[-4:])
    return last_word(reply)


def last_word(text: str) -> str:
    """The last word of a reply, without the final full stop ("" for an empty reply)."""
    words = text.strip().rstrip(".").split()
    return words[-1] if words else ""
