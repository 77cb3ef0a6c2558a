"""Ranking metrics against hand-computed cases."""

import math

import numpy as np
import pytest

from pixelrec.errors import PixelrecError
from pixelrec.index.metrics import (
    POPULARITY_BUCKETS,
    hits,
    ndcg_at_k,
    ndcg_gains,
    popularity_buckets,
    recall_at_k,
    sampled_ranks,
    summarize,
    summarize_groups,
    target_buckets,
    target_ranks,
)

RANKS = np.array([0, 2, -1, 9])


def test_target_ranks_finds_first_position_or_minus_one():
    topk = np.array([[7, 3, 5], [1, 2, 3], [4, 4, 9], [8, 6, 2]])
    targets = np.array([5, 1, 4, 11])
    assert target_ranks(topk, targets).tolist() == [2, 0, 0, -1]


def test_target_ranks_rejects_mismatched_shapes():
    with pytest.raises(PixelrecError, match="target_ranks"):
        target_ranks(np.zeros((3, 2), dtype=np.int64), np.zeros(2, dtype=np.int64))


def test_recall_hand_computed():
    assert recall_at_k(RANKS, 1) == 0.25
    assert recall_at_k(RANKS, 3) == 0.5
    assert recall_at_k(RANKS, 5) == 0.5
    assert recall_at_k(RANKS, 9) == 0.5  # rank 9 is the 10th item: outside the top 9
    assert recall_at_k(RANKS, 10) == 0.75


@pytest.mark.smoke
def test_ndcg_hand_computed():
    assert ndcg_at_k(RANKS, 1) == pytest.approx(1 / 4)
    assert ndcg_at_k(RANKS, 5) == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert ndcg_at_k(RANKS, 10) == pytest.approx((1 + 0.5 + 1 / math.log2(11)) / 4)


def test_per_user_arrays():
    assert hits(RANKS, 5).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert ndcg_gains(RANKS, 10) == pytest.approx([1.0, 0.5, 0.0, 1 / math.log2(11)])


def test_summarize_keys_and_values():
    summary = summarize(RANKS, ks=(1, 10))
    assert summary == {
        "recall@1": 0.25,
        "ndcg@1": 0.25,
        "recall@10": 0.75,
        "ndcg@10": pytest.approx((1 + 0.5 + 1 / math.log2(11)) / 4),
        "users": 4,
    }


def test_summarize_empty_gives_none():
    assert summarize(np.array([], dtype=np.int64), ks=(5,)) == {"recall@5": None, "ndcg@5": None, "users": 0}


def test_summarize_groups_splits_users():
    groups = np.array(["a", "b", "a", "b"])
    result = summarize_groups(RANKS, groups, ks=(5,), order=["b", "c"])
    assert list(result) == ["b", "c", "a"]
    assert result["a"]["recall@5"] == 0.5 and result["a"]["users"] == 2
    assert result["b"]["recall@5"] == 0.5 and result["b"]["ndcg@5"] == pytest.approx(0.25)
    assert result["c"]["users"] == 0


def test_bad_k_and_bad_ranks():
    with pytest.raises(PixelrecError, match="positive integer"):
        recall_at_k(RANKS, 0)
    with pytest.raises(PixelrecError, match="integer array"):
        recall_at_k(np.array([0.5]), 1)


def test_sampled_ranks_counts_ties_pessimistically():
    targets = np.array([0.9, 0.5, 0.1, 0.3, np.nan])
    negatives = np.array([
        [0.1, 0.2, 0.3],      # all below -> rank 0
        [0.5, 0.6, 0.1],      # one tie + one above -> rank 2
        [0.2, 0.3, 0.4],      # all above -> rank 3
        [0.3, 0.3, np.nan],   # two ties, NaN ignored -> rank 2
        [0.1, 0.2, 0.3],      # NaN target -> worst rank 3
    ])
    assert sampled_ranks(targets, negatives).tolist() == [0, 2, 3, 2, 3]


def test_sampled_ranks_constant_model_gets_worst_rank():
    assert sampled_ranks(np.zeros(2), np.zeros((2, 99))).tolist() == [99, 99]


def test_popularity_bucket_boundaries():
    counts = np.array([0, 1, 9, 10, 99, 100, 999, 1000, 123456])
    expected = ["cold (0)", "1-9", "1-9", "10-99", "10-99", "100-999", "100-999", "1000+", "1000+"]
    assert popularity_buckets(counts).tolist() == expected
    assert set(expected) == set(POPULARITY_BUCKETS)


def test_target_buckets_and_out_of_range_target():
    counts = np.array([0, 5, 0, 50, 5000])  # indexed by item id; 0 is padding
    assert target_buckets(counts, np.array([4, 2, 1, 3])).tolist() == ["1000+", "cold (0)", "1-9", "10-99"]
    with pytest.raises(PixelrecError, match="target item id 7"):
        target_buckets(counts, np.array([1, 7]))
