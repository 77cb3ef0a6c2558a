"""build_sequences / load_sequences / SequenceData: time order, vocabularies, the leave-one-out split (SPEC §7)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pixelrec.data.sequences import PAD, SequenceData, build_sequences, load_sequences
from pixelrec.errors import PixelrecError


def frame(rows):
    """rows: (item_id, user_id, timestamp) in file order."""
    return pd.DataFrame(
        {
            "item_id": np.array([r[0] for r in rows], dtype=object),
            "user_id": np.array([r[1] for r in rows], dtype=object),
            "timestamp": np.array([r[2] for r in rows], dtype=np.int64),
        }
    )


def seq_ids(data: SequenceData, user: str) -> list[str]:
    return [data.item_ids[i] for i in data.sequence(data.user_index[user])]


# A small data set used by several tests:
#   u1: a(5) c(1) b(3) d(3) e(9)   -> by time: c, b, d (tie with b: file order), a, e
#   u2: b(2) a(2) c(1)             -> c, b, a (tie: file order b before a)
#   u3: x(1) y(2)                  -> dropped (2 interactions); x, y only seen here
#   u4: a(1)                       -> dropped
ROWS = [
    ("a", "u1", 5),
    ("b", "u2", 2),
    ("c", "u1", 1),
    ("x", "u3", 1),
    ("b", "u1", 3),
    ("a", "u2", 2),
    ("d", "u1", 3),
    ("y", "u3", 2),
    ("c", "u2", 1),
    ("a", "u4", 1),
    ("e", "u1", 9),
]


@pytest.fixture
def data():
    return build_sequences(frame(ROWS), source="mem")


def test_vocabulary_pad_first_then_sorted_ids(data):
    assert list(data.item_ids) == [PAD, "a", "b", "c", "d", "e"]
    assert data.item_ids[0] == "[PAD]"
    assert data.num_items == 5
    assert data.item_index == {"[PAD]": 0, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5}


def test_items_sorted_as_strings_not_numbers():
    df = frame([("10", "u", 1), ("9", "u", 2), ("010", "u", 3), ("1", "u", 4)])
    d = build_sequences(df)
    assert list(d.item_ids) == [PAD, "010", "1", "10", "9"]
    assert seq_ids(d, "u") == ["10", "9", "010", "1"]


@pytest.mark.smoke
def test_time_order_with_stable_ties(data):
    assert seq_ids(data, "u1") == ["c", "b", "d", "a", "e"]
    assert seq_ids(data, "u2") == ["c", "b", "a"]
    assert list(data.sequence(data.user_index["u1"])) == [3, 2, 4, 1, 5]


def test_ties_keep_file_order_even_when_reversed():
    # same timestamps, file order decides: swapping the two tied rows swaps them in the sequence
    d1 = build_sequences(frame([("p", "u", 7), ("q", "u", 7), ("r", "u", 1)]))
    d2 = build_sequences(frame([("q", "u", 7), ("p", "u", 7), ("r", "u", 1)]))
    assert seq_ids(d1, "u") == ["r", "p", "q"]
    assert seq_ids(d2, "u") == ["r", "q", "p"]
    assert d1.fingerprint != d2.fingerprint


def test_ties_stable_with_many_rows():
    # a large all-tied user: a non-stable sort (quicksort) would scramble the order
    n = 500
    rows = [(f"i{k:04d}", "u", 42) for k in range(n)]
    d = build_sequences(frame(rows))
    assert seq_ids(d, "u") == [f"i{k:04d}" for k in range(n)]


def test_users_sorted_and_csr_layout(data):
    assert list(data.user_ids) == ["u1", "u2"]
    assert data.num_users == 2
    assert data.offsets.tolist() == [0, 5, 8]
    assert data.lengths.tolist() == [5, 3]
    assert data.num_interactions == 8
    assert data.items.dtype == np.int64
    assert data.items.tolist() == [3, 2, 4, 1, 5, 3, 2, 1]


def test_dropped_counts(data):
    assert data.dropped_users == 2  # u3 (2 rows), u4 (1 row)
    assert data.dropped_interactions == 3
    assert data.dropped_items == 2  # x and y only appear in u3; a (u4) is also kept elsewhere
    s = data.summary()
    assert s["dropped_users"] == 2 and s["dropped_interactions"] == 3 and s["dropped_items"] == 2
    assert s["users"] == 2 and s["items"] == 5 and s["interactions"] == 8 and s["source"] == "mem"
    assert s["fingerprint"] == data.fingerprint


def test_min_interactions_threshold():
    rows = [("a", "u1", 1), ("b", "u1", 2), ("c", "u1", 3), ("d", "u1", 4),
            ("a", "u2", 1), ("b", "u2", 2), ("c", "u2", 3)]
    d = build_sequences(frame(rows), min_interactions=4)
    assert list(d.user_ids) == ["u1"]
    assert d.dropped_users == 1 and d.dropped_interactions == 3 and d.dropped_items == 0
    with pytest.raises(PixelrecError, match="at least 3"):
        build_sequences(frame(rows), min_interactions=2)


def test_split_targets_and_histories(data):
    u1, u2 = data.user_index["u1"], data.user_index["u2"]
    # u1 = c b d a e = [3, 2, 4, 1, 5]; u2 = c b a = [3, 2, 1]
    assert data.targets("test").tolist() == [5, 1]
    assert data.targets("valid").tolist() == [1, 2]
    assert data.history(u1, "test").tolist() == [3, 2, 4, 1]
    assert data.history(u1, "valid").tolist() == [3, 2, 4]
    assert data.history(u1, "all").tolist() == [3, 2, 4, 1, 5]
    assert data.history(u2, "test").tolist() == [3, 2]
    assert data.history(u2, "valid").tolist() == [3]
    assert data.train_sequence(u1).tolist() == [3, 2, 4]
    assert data.train_sequence(u2).tolist() == [3]


def test_train_counts_only_training_positions(data):
    # training positions: u1 -> c b d ; u2 -> c.   a, e are only valid/test targets
    counts = data.train_counts
    assert counts.shape == (6,)
    assert counts.tolist() == [0, 0, 1, 2, 1, 0]


def test_fingerprint_invariant_to_interleaving_of_users():
    # the same per-user sequences, rows of different users interleaved differently
    rows_a = [("a", "u1", 1), ("b", "u1", 2), ("c", "u1", 2), ("d", "u2", 1), ("a", "u2", 5), ("e", "u2", 6)]
    rows_b = [("d", "u2", 1), ("a", "u2", 5), ("b", "u1", 2), ("e", "u2", 6), ("c", "u1", 2), ("a", "u1", 1)]
    d1, d2 = build_sequences(frame(rows_a)), build_sequences(frame(rows_b))
    assert seq_ids(d1, "u1") == seq_ids(d2, "u1") == ["a", "b", "c"]
    assert d1.fingerprint == d2.fingerprint
    assert len(d1.fingerprint) == 64


def test_fingerprint_changes_when_a_timestamp_changes_order():
    rows = [("a", "u1", 1), ("b", "u1", 2), ("c", "u1", 3)]
    moved = [("a", "u1", 1), ("b", "u1", 4), ("c", "u1", 3)]
    same_order = [("a", "u1", 1), ("b", "u1", 2), ("c", "u1", 30)]
    f = build_sequences(frame(rows)).fingerprint
    assert build_sequences(frame(moved)).fingerprint != f
    # a timestamp change that keeps the order is the same data for the model
    assert build_sequences(frame(same_order)).fingerprint == f


def test_fingerprint_changes_with_a_renamed_item_or_user():
    rows = [("a", "u1", 1), ("b", "u1", 2), ("c", "u1", 3)]
    f = build_sequences(frame(rows)).fingerprint
    assert build_sequences(frame([("a", "u1", 1), ("b", "u1", 2), ("z", "u1", 3)])).fingerprint != f
    assert build_sequences(frame([("a", "v1", 1), ("b", "v1", 2), ("c", "v1", 3)])).fingerprint != f


def test_item_vocab_fixes_indices():
    vocab = np.array([PAD, "z", "a", "m", "q"], dtype=object)  # not sorted: order is the run's
    rows = [("a", "u", 1), ("m", "u", 2), ("z", "u", 3)]
    d = build_sequences(frame(rows), item_vocab=vocab)
    assert list(d.item_ids) == list(vocab)
    assert d.num_items == 4  # q is in the vocabulary even though unused
    assert d.items.tolist() == [2, 3, 1]
    assert d.dropped_items == 0
    assert d.train_counts.shape == (5,)


def test_item_vocab_unknown_item_is_named():
    vocab = np.array([PAD, "a", "b"], dtype=object)
    rows = [("a", "u", 1), ("b", "u", 2), ("new-item", "u", 3)]
    with pytest.raises(PixelrecError) as err:
        build_sequences(frame(rows), item_vocab=vocab, source="more.csv")
    msg = str(err.value)
    assert "'new-item'" in msg and "more.csv" in msg and "vocabulary" in msg


def write_csv(path, rows, header="item_id,user_id,timestamp"):
    path.write_text(header + "\n" + "".join(f"{i},{u},{t}\n" for i, u, t in rows))
    return path


def test_load_sequences_end_to_end(tmp_path):
    p = write_csv(tmp_path / "i.csv", ROWS)
    d = load_sequences(str(p))
    assert d.source == str(p)
    assert seq_ids(d, "u1") == ["c", "b", "d", "a", "e"]
    assert d.fingerprint == build_sequences(frame(ROWS)).fingerprint


def test_load_sequences_keeps_string_ids(tmp_path):
    rows = [("007", "01", 3), ("7", "01", 2), ("0007", "01", 1)]
    d = load_sequences(str(write_csv(tmp_path / "i.csv", rows)))
    assert list(d.user_ids) == ["01"]
    assert seq_ids(d, "01") == ["0007", "7", "007"]
    assert list(d.item_ids) == [PAD, "0007", "007", "7"]


def test_load_sequences_nobody_has_three(tmp_path):
    rows = [("a", "u1", 1), ("b", "u1", 2), ("a", "u2", 1)]
    p = write_csv(tmp_path / "few.csv", rows)
    with pytest.raises(PixelrecError) as err:
        load_sequences(str(p))
    msg = str(err.value)
    assert "few.csv" in msg and "2 users dropped" in msg and "\n" not in msg


def test_load_sequences_propagates_bad_input(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("item_id,user,timestamp\na,u,1\n")
    with pytest.raises(PixelrecError, match="user_id"):
        load_sequences(str(p))
