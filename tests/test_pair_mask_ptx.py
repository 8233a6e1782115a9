"""The inline PTX of the backward's pair masks (``KernelConfig.pair_mask``), run on the CPU by an emulator of the
instructions it uses, written from the PTX ISA: ``set.<cmp>.u32.f16x2 d, a, b`` compares the two fp16 halves of
``a`` and ``b`` and writes 0xffff or 0 to each half of ``d``; ``and.b32`` / ``or.b32`` are bitwise. Any other
instruction fails the emulator, so a change of the PTX must come with its semantics here.

The interpreter never runs this PTX (it applies the same fp16 compares with ``tl.where``; tests/test_kernel.py checks
that path against the shipped kernel), so this is where the PTX text itself is checked: each kind's asm, on random
16-bit payloads (NaN and inf bit patterns included), tile offsets 0..255 and int32 bounds of any size shifted by
the tile start and converted to fp16 as the kernel does, must keep exactly the halves the int32 tests see.
"""
import importlib
import re

import numpy as np
import pytest

kernel_module = importlib.import_module("tte_flash.kernels.tte_attention")
block_table = importlib.import_module("tte_flash.kernels.block_table")

HALF = np.uint32(0xFFFF)


def _halves(register):
    """The two fp16 halves of uint32 registers: (low, high) as float16 arrays."""
    return [((register >> np.uint32(shift)) & HALF).astype(np.uint16).view(np.float16) for shift in (0, 16)]


def run_ptx(text: str, inputs: list) -> np.ndarray:
    """Run the inline-asm block ``text`` elementwise: ``inputs`` are $1, $2, ... (uint32 arrays), returns $0."""
    body = text.strip()
    assert body.startswith("{") and body.endswith("}"), text
    registers = {f"${i}": np.asarray(x, dtype=np.uint32) for i, x in enumerate(inputs, start=1)}
    for statement in (s.strip() for s in body[1:-1].split(";")):
        if not statement or statement.startswith(".reg "):
            continue
        opcode, operands = statement.split(None, 1)
        destination, *sources = (x.strip() for x in operands.split(","))
        values = [registers[name] for name in sources]
        if opcode == "and.b32":
            result = values[0] & values[1]
        elif opcode == "or.b32":
            result = values[0] | values[1]
        elif (match := re.fullmatch(r"set\.(ge|lt)\.u32\.f16x2", opcode)):
            compare = np.greater_equal if match.group(1) == "ge" else np.less
            result = np.uint32(0)
            for shift, a, b in zip((0, 16), _halves(values[0]), _halves(values[1])):
                result = result | np.where(compare(a, b), HALF << np.uint32(shift), np.uint32(0)).astype(np.uint32)
        else:
            raise AssertionError(f"the emulator does not know {opcode!r}: add its PTX semantics")
        registers[destination] = np.asarray(result, dtype=np.uint32)
    return registers["$0"]


def _pack(low, high) -> np.ndarray:
    """Two 16-bit arrays (any 16-bit dtype) as one uint32 register each: ``low`` in bits 0-15 (element 0)."""
    return low.view(np.uint16).astype(np.uint32) | (high.view(np.uint16).astype(np.uint32) << np.uint32(16))


def _tile_bound(bound, start):
    """The kernel's _tile_bound: ``bound - start`` (int32) converted to fp16 (round to nearest, inf past 65504)."""
    return (bound - start).astype(np.float16)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # bounds past fp16's range: inf
@pytest.mark.parametrize("kind", [block_table.CUT_LO, block_table.CUT_HI, block_table.CUT_LO_HI,
                                  block_table.CUT_ANY])
def test_each_kinds_ptx_keeps_exactly_the_halves_its_tests_see(kind):
    rng = np.random.default_rng(kind)
    n = 200_000
    start = rng.integers(0, 200_000, n).astype(np.int32)  # the tile's first key (or row)

    def bounds():  # per half: near the tile (every cut inside it) or anywhere from far below to far above
        near = start + rng.integers(-3, 260, n)
        far = start + rng.integers(-300_000, 300_000, n)
        return np.where(rng.random(n) < 0.7, near, far).astype(np.int32)
    halves = []
    for _ in range(2):  # each half of a register: its own offset and bounds (pairs need not share a row)
        offset = rng.integers(0, 256, n).astype(np.int32)
        lo, hi, gap_lo, gap_hi = bounds(), bounds(), bounds(), bounds()
        key = start + offset
        see = {block_table.CUT_LO: key >= lo, block_table.CUT_HI: key < hi,
               block_table.CUT_LO_HI: (key >= lo) & (key < hi),
               block_table.CUT_ANY: (key >= lo) & (key < hi) & ((key < gap_lo) | (key >= gap_hi))}[kind]
        halves.append(dict(offset=offset.astype(np.float16), see=see,
                           **{name: _tile_bound(b, start) for name, b in
                              (("lo", lo), ("hi", hi), ("gap_lo", gap_lo), ("gap_hi", gap_hi))}))
    payload = rng.integers(0, 2**16, (2, n)).astype(np.uint16)  # any bits: NaN, inf and -0 patterns too
    payload[:, :64] = [[0x7FC0], [0xFF80]]  # a NaN and -inf in bf16, certainly present

    def register(name):
        return _pack(halves[0][name], halves[1][name])
    # the operands in the order _keep_seen passes them: $1 the tile, $2 the offsets, then the kind's bounds
    operands = {block_table.CUT_LO: ["lo"], block_table.CUT_HI: ["hi"], block_table.CUT_LO_HI: ["lo", "hi"],
                block_table.CUT_ANY: ["lo", "hi", "gap_lo", "gap_hi"]}[kind]
    got = run_ptx(kernel_module._PAIR_ASM_TEXT[kind],
                  [_pack(payload[0], payload[1]), register("offset"), *(register(name) for name in operands)])
    expected = _pack(np.where(halves[0]["see"], payload[0], 0).astype(np.uint16),
                     np.where(halves[1]["see"], payload[1], 0).astype(np.uint16))
    assert np.array_equal(got, expected)
    assert 0.05 < halves[0]["see"].mean() < 0.95  # both answers occur


def test_the_emulator_is_not_vacuous():
    """A compare the wrong way round, or operands swapped, gives a different answer (the emulator checks semantics,
    not text)."""
    a, b = _pack(np.array([1.0], np.float16), np.array([5.0], np.float16)), np.full(1, 0x40004000, np.uint32)  # 2, 2
    assert run_ptx("{ set.lt.u32.f16x2 $0, $1, $2; }", [a, b])[0] == 0x0000FFFF
    assert run_ptx("{ set.ge.u32.f16x2 $0, $1, $2; }", [a, b])[0] == 0xFFFF0000
    assert run_ptx("{ set.lt.u32.f16x2 $0, $2, $1; }", [a, b])[0] == 0xFFFF0000
    with pytest.raises(AssertionError, match="does not know"):
        run_ptx("{ set.le.u32.f16x2 $0, $1, $2; }", [a, b])
