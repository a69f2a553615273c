"""CPU checks of the masks suite (run with `pytest perf/`): its plan, FLOP and byte counts,
the float64 check (whole, or blocks of rows) and whether it can tell each mask from none.
"""

from __future__ import annotations

import pytest
import torch

from perf import shapes
from perf.inputs import DenseInputs, make_inputs, masks_reference, sink_logits
from perf.reference import RowBlocks, check
from perf.shapes import Case

MASKS = shapes.MASKS_SUITE
CPU = torch.device("cpu")


def test_case_validation() -> None:
    with pytest.raises(ValueError, match="masks suite only"):
        Case("grid", 1, 64, 64, 2, 2, 64, True, window=(16, 0))
    with pytest.raises(ValueError, match="masks suite only"):
        Case("decode", 1, 1, 64, 2, 2, 64, True, block_size=16, sinks=True)
    with pytest.raises(ValueError, match="causal sets the right size to 0"):
        Case(MASKS, 1, 64, 64, 2, 2, 64, True, window=(16, 4))
    with pytest.raises(ValueError, match="one causal query"):
        Case(MASKS, 1, 2, 64, 2, 2, 64, True, block_size=16)
    Case(MASKS, 1, 64, 64, 2, 2, 64, False, window=(16, 4))  # two-sided, non-causal: fine


@pytest.mark.parametrize(
    ("seqlen_q", "seqlen_k", "causal", "window"),
    [
        (40, 40, True, (7, 0)),
        (40, 40, False, (5, 3)),
        (12, 40, True, (9, -1)),
        (40, 12, False, (-1, 2)),
    ],
)
def test_window_flops_count_the_band(
    seqlen_q: int, seqlen_k: int, causal: bool, window: tuple[int, int]
) -> None:
    offset = seqlen_k - seqlen_q
    rows = torch.arange(seqlen_q)[:, None] + offset
    cols = torch.arange(seqlen_k)[None, :]
    right = 0 if causal else window[1]
    shown = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if right >= 0:
        shown &= cols <= rows + right
    if window[0] >= 0:
        shown &= cols >= rows - window[0]
    pairs = shapes.visible_pairs(seqlen_q, seqlen_k, causal, window=window)
    assert pairs == int(shown.sum())
    case = Case(MASKS, 2, seqlen_q, seqlen_k, 3, 1, 16, causal, window=window)
    assert shapes.flops(case) == 4 * 2 * 3 * 16 * pairs


def test_decode_window_reads_its_pages() -> None:
    plain, windowed = (
        c for c in shapes.select(shapes.full_cases(), (MASKS,)) if c.is_decode and c.batch == 8
    )
    # One query at position 32767 sees keys 28671..32767, in pages 1791..2047 of 16.
    assert shapes.key_span(windowed) == (2047 - 1791 + 1) * 16 == 4112
    assert shapes.kv_bytes(windowed) == 8 * 4112 * 8 * 128 * 2 * 2
    assert shapes.kv_bytes(plain) == 8 * 32768 * 8 * 128 * 2 * 2
    assert shapes.kv_bytes(plain) / shapes.kv_bytes(windowed) == pytest.approx(7.969, abs=1e-3)
    assert shapes.flops(windowed) == 4 * 8 * 32 * 128 * 4097
    # Brute force on a small cache: the pages holding a visible key.
    for context, block, left in ((64, 16, 20), (64, 16, 15), (96, 32, 0), (48, 16, 100)):
        case = Case(MASKS, 1, 1, context, 2, 1, 16, True, block_size=block, window=(left, 0))
        pages = {j // block for j in range(context) if context - 1 - left <= j}
        assert shapes.key_span(case) == len(pages) * block
    # A dense window leaves no key unseen: every key is read.
    dense = next(c for c in shapes.full_cases() if c.suite == MASKS and c.window != (-1, -1))
    assert shapes.kv_bytes(dense) == 2 * 16384 * 16 * 128 * 2


def test_check_rows_of_the_full_plan() -> None:
    dense = [c for c in shapes.select(shapes.full_cases(), (MASKS,)) if not c.is_decode]
    for case in dense:
        blocks = shapes.masks_check_rows(case)
        middle = (3969, 4225) if case.window != (-1, -1) else (8064, 8320)
        assert blocks == ((0, 256), middle, (16128, 16384)), case.label()
    assert all(
        shapes.masks_check_rows(c) is None
        for c in shapes.select(shapes.full_cases(), (MASKS,))
        if c.is_decode
    )
    with pytest.raises(ValueError, match="hides every key right of the diagonal"):
        shapes.masks_check_rows(Case(MASKS, 1, 8192, 8192, 16, 16, 128, False, window=(64, 64)))
    # Blocks that overlap merge; a block never runs past the last row.
    near = Case(MASKS, 1, 8192, 8192, 16, 16, 128, True, window=(100, 0))
    assert shapes.masks_check_rows(near) == ((0, 256), (7936, 8192))


def _reduced(window_left: int = 96, seqlen: int = 512) -> list[Case]:
    """The plan's dense masks at a CPU size (H4 d64, the window a fraction of S)."""
    dims = (MASKS, 1, seqlen, seqlen, 4, 4, 64)
    return [
        Case(*dims, True),
        Case(*dims, True, window=(window_left, 0)),
        Case(*dims, True, softcap=shapes.MASKS_SOFTCAP),
        Case(*dims, True, sinks=True),
        Case(*dims, False),
        Case(*dims, False, softcap=shapes.MASKS_SOFTCAP),
    ]


def test_row_blocks_equal_the_whole_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block of rows, computed with the keys up to its end, is exactly those rows of
    the whole float64 reference (bottom-right alignment keeps every row on its diagonal)."""
    for case in _reduced(window_left=100, seqlen=200):
        inputs = make_inputs(case, torch.bfloat16, CPU, seed=1)
        whole = masks_reference(case, inputs)
        assert isinstance(whole, torch.Tensor) and whole.dtype == torch.float64
        monkeypatch.setattr(shapes, "MASKS_FULL_CHECK_SCORES", 0)
        monkeypatch.setattr(shapes, "MASKS_CHECK_ROWS", 32)
        blocks = masks_reference(case, inputs)
        monkeypatch.undo()
        assert isinstance(blocks, RowBlocks) and blocks.shape == tuple(whole.shape)
        assert len(blocks.blocks) == 3
        for start, part in blocks.blocks:
            rows = whole[:, start : start + 32]
            torch.testing.assert_close(part, rows, rtol=0, atol=1e-12)
        assert check(whole.to(torch.bfloat16), blocks, torch.bfloat16).ok
        wrong = whole.clone()
        wrong[:, blocks.blocks[-1][0] + 5] += 1.0  # an error in a checked row is seen
        assert not check(wrong.to(torch.bfloat16), blocks, torch.bfloat16).ok


def test_the_check_tells_each_mask_from_none() -> None:
    """With the suite's inputs (q x 2, its sink logits), the output of the same problem
    without the mask fails the check against the masked reference: a provider that ignored
    the window, the softcap or the sinks would be flagged. The masked reference in bf16
    passes."""
    cases = _reduced()
    for case in cases[1:4] + cases[5:]:
        inputs = make_inputs(case, torch.bfloat16, CPU, seed=2)
        ref = masks_reference(case, inputs)
        assert isinstance(inputs, DenseInputs) and isinstance(ref, torch.Tensor)
        plain_case = Case(MASKS, 1, case.seqlen_q, case.seqlen_k, 4, 4, 64, case.causal)
        unmasked = masks_reference(plain_case, inputs)
        assert isinstance(unmasked, torch.Tensor)
        assert check(ref.to(torch.bfloat16), ref, torch.bfloat16).ok, case.label()
        assert not check(unmasked.to(torch.bfloat16), ref, torch.bfloat16).ok, case.label()
    assert float(inputs.q.float().std()) == pytest.approx(shapes.MASKS_Q_SCALE, rel=0.05)
    sinks = sink_logits(cases[3], CPU)
    assert sinks.dtype == torch.float32 and tuple(sinks.shape) == (4,)
