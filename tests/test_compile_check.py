"""The SASS loop parser of ``benchmarks/compile_check.py`` on hand-written ``nvdisasm -c -gi`` text: which loops
are tile loops, which kind each runs, and how many instructions one iteration (one tile) executes.

The snippets follow nvdisasm's format: ``/*address*/ INSTRUCTION ;`` lines, ``.L_x_N:`` labels, a backward
``BRA `(.L_x_N)`` closing a loop, and ``//## File "...", line N [inlined at "...", line M]`` comments
naming the source lines of the instructions that follow them. No compiler is needed.
"""
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.compile_check import mask_kind_lines, sass_tile_loops  # noqa: E402

# A kernel source shaped like kernels/tte_attention.py: a tile function taking MASK, one branch per kind
KERNEL = textwrap.dedent('''\
    LO, HI, BOTH = 1, 2, 3


    def see(k, lo, hi, MASK):
        if MASK == LO:
            s = k >= lo
        elif MASK == HI:
            s = k < hi
        elif MASK == BOTH:
            s = (k >= lo) & (k < hi)
        return s


    def tiles(acc, MASK):
        for block in range(4):
            if MASK != 0 or MASK == 7 + 0 * block:
                acc = acc
            x = acc * 2
            if MASK != 0:
                x = see(x, 0, 1, MASK)
            acc = acc + x
        return acc


    def kernel(acc):
        acc = tiles(acc, 0)
        return acc
    ''')
# lines of KERNEL: 6 = LO body, 8 = HI body, 10 = BOTH body, 18 = in the loop of tiles(), 26 = the call in kernel()
LO_LINE, HI_LINE, BOTH_LINE, TILE_LINE, CALL_LINE = 6, 8, 10, 18, 26
SRC = "/src/kernel.py"
NAMESPACE = {"LO": 1, "HI": 2, "BOTH": 3}


def kernel_lines(tmp_path):
    path = tmp_path / "kernel.py"
    path.write_text(KERNEL)
    lines = mask_kind_lines(str(path), NAMESPACE)
    return {"tiles": lines["tiles"], "kinds": lines["kinds"]}


class Sass:
    """Builds nvdisasm-style text: instructions at consecutive addresses (16 bytes apart), labels, line comments."""

    def __init__(self):
        self.text, self.address, self.next_label = [], 0, 0

    def at(self, *lines, file=SRC, inlined_at=None):
        for line in lines:
            where = f' inlined at "{SRC}", line {inlined_at}' if inlined_at else ""
            self.text.append(f'\t//## File "{file}", line {line}{where}')
        return self

    def ops(self, count, name="FFMA R2, R2, R3, R4"):
        for _ in range(count):
            self.text.append(f"        /*{self.address:04x}*/                   {name} ;")
            self.address += 16
        return self

    def label(self):
        name = f".L_x_{self.next_label}"
        self.next_label += 1
        self.text.append(f"{name}:")
        return name

    def branch(self, label, predicate="@P0 "):
        self.text.append(f"        /*{self.address:04x}*/               {predicate}BRA `({label}) ;")
        self.address += 16
        return self

    def loop(self, body_lines, count, inlined_at=None):
        """A loop of ``count`` instructions including its closing branch, all attributed to ``body_lines``."""
        top = self.label()
        self.at(*body_lines, inlined_at=inlined_at).ops(count - 1)
        return self.branch(top)

    def __str__(self):
        return "\n".join(self.text) + "\n"


def test_mask_kind_lines_reads_the_kind_branches(tmp_path):
    lines = kernel_lines(tmp_path)
    assert lines["kinds"] == {LO_LINE: 1, HI_LINE: 2, BOTH_LINE: 3}  # `!=` and `or` tests are not a kind
    assert set(range(4, 12)) | set(range(14, 23)) == lines["tiles"]  # the functions that take MASK
    assert CALL_LINE not in lines["tiles"]


def test_one_loop_per_kind_counts_its_instructions(tmp_path):
    lines = kernel_lines(tmp_path)
    sass = Sass().at(CALL_LINE).ops(7)  # prologue: not a loop
    sass.loop([TILE_LINE], 10)  # mask-free: only tile lines
    sass.loop([TILE_LINE, LO_LINE], 13)
    sass.loop([TILE_LINE, HI_LINE], 14, inlined_at=CALL_LINE)  # Triton 3.9 also names the inlined-at line
    sass.loop([TILE_LINE, BOTH_LINE], 17)
    sass.at(CALL_LINE).ops(3)
    assert sass_tile_loops(str(sass), SRC, lines) == {0: 10, 1: 13, 2: 14, 3: 17}


def test_only_innermost_loops_and_backward_branches_count(tmp_path):
    lines = kernel_lines(tmp_path)
    sass = Sass()
    outer = sass.label()
    sass.at(TILE_LINE).ops(4)
    sass.loop([TILE_LINE], 6)  # the inner loop: one tile
    forward = ".L_x_99"
    sass.at(TILE_LINE).ops(2).branch(forward, predicate="@!P1 ")  # a forward branch (skip), not a loop
    sass.ops(3)
    sass.text.append(f"{forward}:")
    sass.ops(1).branch(outer)  # closes the outer loop (range loop around the tile loop)
    assert sass_tile_loops(str(sass), SRC, lines) == {0: 6}


def test_loops_of_two_kinds_or_of_no_tile_are_left_out(tmp_path):
    lines = kernel_lines(tmp_path)
    sass = Sass()
    sass.loop([TILE_LINE, LO_LINE, HI_LINE], 9)  # two kinds' lines: ambiguous
    sass.loop([CALL_LINE], 5)  # no line of a tile function (e.g. a prologue loop)
    sass.loop([LO_LINE], 8)
    assert sass_tile_loops(str(sass), SRC, lines) == {1: 8}


def test_lines_of_other_files_are_ignored_and_repeated_kinds_averaged(tmp_path):
    lines = kernel_lines(tmp_path)
    sass = Sass()
    top = sass.label()
    sass.at(HI_LINE, file="/other/standard.py").at(TILE_LINE).ops(9)  # line 8 of another file is not HI
    sass.branch(top)
    sass.loop([TILE_LINE], 11)  # a second mask-free loop (an unrolled range): the mean of 10 and 11
    sass.loop([HI_LINE], 20)
    sass.loop([HI_LINE], 25)
    assert sass_tile_loops(str(sass), SRC, lines) == {0: 10.5, 2: 22.5}


def test_the_kernels_have_a_branch_for_every_partial_kind():
    """On the real kernel source: every partial kind of the block table has its own ``if MASK ==`` branch (the
    parser's way to tell the loops apart), and the full kind has none."""
    import importlib
    kernels = importlib.import_module("tte_flash.kernels.tte_attention")
    from tte_flash.kernels import block_table
    lines = mask_kind_lines(kernels.__file__, vars(kernels))
    partial = set(block_table.KIND_NAMES) - {block_table.FULL}
    assert set(lines["kinds"].values()) == partial


def test_a_wait_loop_inside_a_tile_loop_is_not_the_tile_loop(tmp_path):
    """With TMA loads, a tile loop holds a barrier wait loop (no arithmetic): the tile loop is still the one counted,
    its body (wait loop included) once; a loop without arithmetic is never a tile loop."""
    lines = kernel_lines(tmp_path)
    sass = Sass()
    top = sass.label()
    sass.at(TILE_LINE, HI_LINE).ops(5)
    sass.loop([TILE_LINE], 3)  # placeholder, rewritten below as a wait loop (no FFMA)
    sass.text[-3] = sass.text[-3].replace("FFMA R2, R2, R3, R4", "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3")
    sass.text[-2] = sass.text[-2].replace("FFMA R2, R2, R3, R4", "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3")
    sass.at(TILE_LINE).ops(4).branch(top)
    waiting_only = sass.label()
    sass.at(TILE_LINE).ops(2, name="NANOSLEEP 0x20")
    sass.branch(waiting_only)
    assert sass_tile_loops(str(sass), SRC, lines) == {2: 5 + 3 + 4 + 1}


def test_what_if_configs_take_tma_where_a_kernel_has_it():
    """``--config``: /tma for every kernel (the forward's and dQ's K/V, the dK/dV kernel's Q/dO), /ws for the forward
    only, /pairs (16-bit P / dS masked two elements an instruction) for the backward kernels only: asking another
    kernel for one is an error, not a silently ignored flag."""
    import argparse

    import pytest

    from benchmarks.compile_check import parse_config
    assert parse_config("dkdv=32x128/w8/s2/tma") == ("dkdv", (32, 128, 8, 2, 1, True, False, False))
    assert parse_config("dkdv=16x64/w8/s2/l2/tma") == ("dkdv", (16, 64, 8, 2, 2, True, False, False))
    assert parse_config("fwd=128x64/w8/s3/tma/ws") == ("fwd", (128, 64, 8, 3, 1, True, True, False))
    assert parse_config("dq=128x32/w8/s2") == ("dq", (128, 32, 8, 2, 1))
    assert parse_config("dq=128x32/w8/s2/tma") == ("dq", (128, 32, 8, 2, 1, True, False, False))
    assert parse_config("dq=128x64/w8/s2/pairs") == ("dq", (128, 64, 8, 2, 1, False, False, True))
    assert parse_config("dkdv=16x64/w8/s2/l2/tma/pairs") == ("dkdv", (16, 64, 8, 2, 2, True, False, True))
    for wrong in ("dkdv=32x128/w8/s2/ws", "dq=128x32/w8/s2/ws", "dq=128x32/w8/s2/tma/ws", "fwd=128x64/w8/s3/pairs"):
        with pytest.raises(argparse.ArgumentTypeError, match="/ws: fwd only; /pairs: dq, dkdv only"):
            parse_config(wrong)
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected KERNEL=.*\[/tma\]\[/ws\]\[/pairs\]"):
        parse_config("dq=128x64/w8/s2/pairs/tma")  # the flags in that order

