"""Training windows, padding, batching and BPR negative sampling (pixelrec.recommend.batches)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pixelrec.data.sequences import SequenceData, build_sequences
from pixelrec.recommend.batches import (
    Windows,
    iterate_batches,
    left_pad,
    sample_negatives,
    training_windows,
    window_bounds,
)


def make_data(seqs: list[list[int]], num_items: int) -> SequenceData:
    """SequenceData whose users have exactly these full sequences (item indices)."""
    lengths = [len(s) for s in seqs]
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return SequenceData(
        item_ids=np.array(["[PAD]"] + [f"i{k}" for k in range(1, num_items + 1)], dtype=object),
        user_ids=np.array([f"u{k}" for k in range(len(seqs))], dtype=object),
        offsets=offsets,
        items=np.array([x for s in seqs for x in s], dtype=np.int64),
    )


# ---- window_bounds -----------------------------------------------------------------------------


@pytest.mark.smoke
def test_sliding_hand_case():
    # span 5; windows end at 12, 10, 8, 6 training their 2 newest targets; the oldest, (0, 4),
    # trains the 3 targets left (items 1, 2, 3)
    assert window_bounds(12, 4, "sliding", 2) == [(0, 4, 3), (1, 6, 2), (3, 8, 2), (5, 10, 2), (7, 12, 2)]


def test_sliding_stride_equal_to_max_len():
    assert window_bounds(12, 4, "sliding", 4) == [(0, 4, 3), (3, 8, 4), (7, 12, 4)]


def test_sliding_stride_one_is_one_sample_per_prefix():
    # RecBole's construction: every target once, with the max_len items before it as context
    assert window_bounds(7, 3, "sliding", 1) == [(0, 4, 3), (1, 5, 1), (2, 6, 1), (3, 7, 1)]


def test_sliding_exact_fit():
    # ends 13, 9; then 5 = the span: one full oldest window training all 4 of its targets
    assert window_bounds(13, 4, "sliding", 4) == [(0, 5, 4), (4, 9, 4), (8, 13, 4)]


def test_overlapping_hand_case():
    # ends 12, 10, 8, 6 and the oldest full window (0, 5); every target of every window is trained
    assert window_bounds(12, 4, "overlapping", 2) == [(0, 5, 4), (1, 6, 4), (3, 8, 4), (5, 10, 4), (7, 12, 4)]
    assert window_bounds(13, 4, "overlapping", 4) == [(0, 5, 4), (4, 9, 4), (8, 13, 4)]  # no duplicate oldest
    assert window_bounds(4, 4, "overlapping", 2) == [(0, 4, 3)]


@pytest.mark.parametrize("length", range(2, 30))
def test_overlapping_windows_cover_every_transition(length):
    for stride in range(1, 5):
        bounds = window_bounds(length, 4, "overlapping", stride)
        trained = set()
        for s, e, k in bounds:
            assert e - s == min(length, 5) and k == e - s - 1  # full windows, all targets
            trained.update(range(e - k, e))
        assert trained == set(range(1, length))
        assert bounds[-1][1] == length and len(set(bounds)) == len(bounds)


def test_chunks_pixelrec_hand_case():
    # oldest 12 % 5 = 2 items dropped, then non-overlapping chunks of L + 1, all targets trained
    assert window_bounds(12, 4, "chunks", 2) == [(2, 7, 4), (7, 12, 4)]
    assert window_bounds(10, 4, "chunks", 1) == [(0, 5, 4), (5, 10, 4)]
    assert window_bounds(6, 4, "chunks", 1) == [(1, 6, 4)]
    assert window_bounds(22, 10, "chunks", 1) == [(0, 11, 10), (11, 22, 10)]
    assert window_bounds(25, 10, "chunks", 1) == [(3, 14, 10), (14, 25, 10)]


@pytest.mark.parametrize("mode", ["sliding", "overlapping", "chunks"])
def test_short_sequences(mode):
    assert window_bounds(0, 4, mode, 2) == []
    assert window_bounds(1, 4, mode, 2) == []
    assert window_bounds(2, 4, mode, 2) == [(0, 2, 1)]
    assert window_bounds(5, 4, mode, 2) == [(0, 5, 4)]


def test_sliding_stride_outside_one_to_max_len_is_refused():
    for stride in (0, 5):
        with pytest.raises(ValueError, match="stride"):
            window_bounds(12, 4, "sliding", stride)


@pytest.mark.parametrize("max_len", [1, 2, 3, 5])
@pytest.mark.parametrize("length", range(2, 30))
def test_sliding_windows_train_every_transition_once_with_most_context(length, max_len):
    for stride in range(1, max_len + 1):
        bounds = window_bounds(length, max_len, "sliding", stride)
        trained = []
        for s, e, k in bounds:
            assert 0 <= s < e <= length
            assert e - s <= max_len + 1
            assert 1 <= k <= e - s - 1
            for target in range(e - k, e):
                trained.append(target)
                # context = items before the target inside the window: all of them, or at least
                # max_len - stride + 1 once the sequence is longer than a window
                context = target - s
                assert context == target or context >= max_len - stride + 1, (length, max_len, stride, bounds)
        assert sorted(trained) == list(range(1, length)), (length, max_len, stride, bounds)
        assert bounds[-1][1] == length  # the most recent transition is always trained
        assert all(e - s == max_len + 1 for s, e, _ in bounds[1:])  # only the oldest window may be short


@pytest.mark.parametrize("length", range(2, 40))
def test_chunks_are_disjoint_and_drop_only_the_oldest(length):
    L = 4
    bounds = window_bounds(length, L, "chunks", 1)
    if length <= L + 1:
        assert bounds == [(0, length, length - 1)]
        return
    assert bounds[0][0] == length % (L + 1)
    assert bounds[-1][1] == length
    for (s0, e0, _), (s1, e1, _) in zip(bounds, bounds[1:]):
        assert e0 == s1
    assert all(e - s == L + 1 and k == L for s, e, k in bounds)


# ---- training_windows --------------------------------------------------------------------------


def test_training_windows_left_pad_and_use_training_part_only():
    # train sequences: u0 = [1,2,3] (+ valid 4, test 5) ; u1 = [6] (nothing to learn) ; u2 = 7..13 (7 items)
    data = make_data([[1, 2, 3, 4, 5], [6, 6, 6], [7, 8, 9, 10, 11, 12, 13, 1, 2]], num_items=13)
    w = training_windows(data, max_len=4, mode="sliding", stride=2)
    assert isinstance(w, Windows) and len(w) == 3
    assert w.items.dtype == np.int32 and w.trained.dtype == np.int32
    assert w.items.tolist() == [
        [0, 0, 1, 2, 3],
        [7, 8, 9, 10, 11],
        [9, 10, 11, 12, 13],
    ]
    assert w.trained.tolist() == [2, 4, 2]  # targets 8..11, then 12 and 13: each once
    # valid / test targets never appear
    assert 4 not in w.items[0] and 5 not in w.items[0]


def test_training_windows_chunks():
    data = make_data([list(range(1, 15))], num_items=14)  # training part 1..12 (12 items)
    w = training_windows(data, max_len=4, mode="chunks")
    assert w.items.tolist() == [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert w.trained.tolist() == [4, 4]


def test_training_windows_default_stride_is_max_len():
    data = make_data([list(range(1, 15))], num_items=14)  # training part of length 12
    a, b = training_windows(data, 4), training_windows(data, 4, "sliding", 4)
    assert a.items.tolist() == b.items.tolist() and a.trained.tolist() == b.trained.tolist()
    assert len(a) == 3


def test_training_windows_empty():
    data = make_data([[1, 2, 3], [4, 5, 6]], num_items=6)  # each training part has 1 item
    w = training_windows(data, 4)
    assert w.items.shape == (0, 5) and w.trained.shape == (0,)


def test_training_windows_from_built_sequences():
    df = pd.DataFrame({"item_id": list("abcdef"), "user_id": ["u"] * 6, "timestamp": [6, 5, 4, 3, 2, 1]})
    data = build_sequences(df)  # time order f e d c b a -> indices 6 5 4 3 2 1, train part 6 5 4 3
    w = training_windows(data, 3)
    assert w.items.tolist() == [[6, 5, 4, 3]] and w.trained.tolist() == [3]


# ---- left_pad ----------------------------------------------------------------------------------


def test_left_pad():
    out = left_pad([np.array([1, 2, 3, 4, 5, 6]), np.array([7, 8]), np.array([], dtype=np.int64)], 4)
    assert out.dtype == np.int64
    assert out.tolist() == [[3, 4, 5, 6], [0, 0, 7, 8], [0, 0, 0, 0]]


def test_left_pad_exact_and_empty_list():
    assert left_pad([np.array([9, 8, 7])], 3).tolist() == [[9, 8, 7]]
    assert left_pad([], 3).shape == (0, 3)


# ---- iterate_batches ---------------------------------------------------------------------------


def as_windows(items: np.ndarray) -> Windows:
    return Windows(items, (items[:, 0] % 7).astype(np.int32))  # trained: any per-row value to follow the row


def test_iterate_batches_covers_every_window_once():
    windows = as_windows(np.arange(23 * 3, dtype=np.int32).reshape(23, 3))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # two epochs
        batches = list(iterate_batches(windows, 5, gen))
        assert [len(b) for b, _ in batches] == [5, 5, 5, 5, 3]
        assert all(b.dtype == torch.int64 and b.shape[1] == 3 and t.dtype == torch.int64 for b, t in batches)
        rows = torch.cat([b for b, _ in batches])
        trained = torch.cat([t for _, t in batches])
        assert sorted(rows[:, 0].tolist()) == windows.items[:, 0].tolist()
        # rows stay intact (shuffled as a whole), and each keeps its own trained count
        assert all(r.tolist() == windows.items[r[0].item() // 3].tolist() for r in rows)
        assert trained.tolist() == (rows[:, 0] % 7).tolist()


def test_iterate_batches_shuffles_deterministically():
    windows = as_windows(np.arange(50, dtype=np.int32).reshape(50, 1))
    order = lambda seed: torch.cat([b for b, _ in iterate_batches(windows, 8, torch.Generator().manual_seed(seed))]).flatten().tolist()  # noqa: E731
    a, b, c = order(1), order(1), order(2)
    assert a == b
    assert a != c
    assert a != list(range(50))


def test_iterate_batches_empty():
    empty = Windows(np.zeros((0, 4), np.int32), np.zeros(0, np.int32))
    assert list(iterate_batches(empty, 8, torch.Generator().manual_seed(0))) == []


# ---- sample_negatives --------------------------------------------------------------------------


def random_windows(num_windows: int, width: int, num_items: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = np.stack([rng.choice(np.arange(1, num_items + 1), width, replace=False) for _ in range(num_windows)])
    w[: num_windows // 4, :3] = 0  # some left padding
    return torch.from_numpy(w.astype(np.int64))


def test_sample_negatives_avoid_the_window_items():
    seq = random_windows(400, 8, 30, seed=0)  # 8 of 30 items in each window: collisions are common
    neg = sample_negatives(seq, 30, torch.Generator().manual_seed(0))
    assert neg.shape == (400, 7)
    assert neg.dtype == torch.int64
    assert int(neg.min()) >= 1 and int(neg.max()) <= 30
    clash = (neg[:, :, None] == seq[:, None, :]).any(-1)
    assert not clash.any()


def test_sample_negatives_cover_the_allowed_items():
    seq = torch.tensor([[0, 0, 1, 2, 3]])
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        seen.update(sample_negatives(seq, 6, gen).flatten().tolist())
    assert seen == {4, 5, 6}


def test_sample_negatives_single_allowed_item():
    # 9 of 10 items in the window: only item 10 is a valid negative (PixelRec resamples until the
    # negative is not in the sequence; SPEC §6 "one uniform negative per position that is not in
    # the sequence")
    seq = torch.arange(1, 10)[None].repeat(64, 1)  # [64, 9]
    neg = sample_negatives(seq, 10, torch.Generator().manual_seed(0))
    assert (neg == 10).all()


def test_sample_negatives_deterministic_for_a_seeded_generator():
    seq = random_windows(50, 6, 40, seed=1)
    a = sample_negatives(seq, 40, torch.Generator().manual_seed(7))
    b = sample_negatives(seq, 40, torch.Generator().manual_seed(7))
    c = sample_negatives(seq, 40, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
