"""load_interactions: PixelRec interaction CSVs (SPEC §3) and their bad-input errors (SPEC §8)."""

from __future__ import annotations

import numpy as np
import pytest

from pixelrec.data.interactions import load_interactions
from pixelrec.errors import PixelrecError


def write(tmp_path, text: str, name: str = "inter.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def rows(df):
    return list(zip(df["item_id"], df["user_id"], df["timestamp"].tolist()))


# ---- happy path --------------------------------------------------------------------------------


@pytest.mark.smoke
def test_basic_columns_types_and_file_order(tmp_path):
    p = write(tmp_path, "item_id,user_id,timestamp\ni2,u1,30\ni1,u2,10\ni3,u1,20\n")
    df = load_interactions(p)
    assert list(df.columns) == ["item_id", "user_id", "timestamp"]
    assert df["timestamp"].dtype == np.int64
    # rows keep file order (no sorting here)
    assert rows(df) == [("i2", "u1", 30), ("i1", "u2", 10), ("i3", "u1", 20)]
    assert all(isinstance(v, str) for v in df["item_id"]) and all(isinstance(v, str) for v in df["user_id"])


def test_column_order_may_differ_and_extra_columns_ignored(tmp_path):
    p = write(
        tmp_path,
        "rating,timestamp,user_id,comment,item_id\n"
        "5,100,alice,great,x1\n"
        "oops,200,bob,,x2\n",
    )
    df = load_interactions(p)
    assert list(df.columns) == ["item_id", "user_id", "timestamp"]
    assert rows(df) == [("x1", "alice", 100), ("x2", "bob", 200)]


def test_ids_kept_as_exact_strings(tmp_path):
    p = write(tmp_path, "item_id,user_id,timestamp\n007,0042,1\n7,42,2\n1e5,1.50,3\n")
    df = load_interactions(p)
    assert list(df["item_id"]) == ["007", "7", "1e5"]
    assert list(df["user_id"]) == ["0042", "42", "1.50"]


def test_negative_and_large_timestamps_are_integers(tmp_path):
    p = write(tmp_path, "item_id,user_id,timestamp\na,u,-3\nb,u,0\nc,u,1700000000\n")
    assert load_interactions(p)["timestamp"].tolist() == [-3, 0, 1700000000]


def test_nanosecond_timestamps_keep_full_precision(tmp_path):
    # 19-digit (nanosecond) timestamps do not fit a float64 exactly: parsing them through floats
    # merges neighbouring values (and so changes the time order of a user's items).
    ts = [1700000000000000001, 1700000000000000003, 9007199254740993]
    p = write(tmp_path, "item_id,user_id,timestamp\n" + "".join(f"i{k},u,{t}\n" for k, t in enumerate(ts)))
    assert load_interactions(p)["timestamp"].tolist() == ts


@pytest.mark.parametrize("item", ["NA", "null", "nan", "None", "<NA>"])
def test_ids_that_look_like_missing_values_are_kept(tmp_path, item):
    # ids are strings exactly as written (SPEC §3): "NA" or "null" is an id, not an empty field
    p = write(tmp_path, f"item_id,user_id,timestamp\n{item},NULL,1\nb,u,2\n")
    df = load_interactions(p)
    assert list(df["item_id"]) == [item, "b"]
    assert list(df["user_id"]) == ["NULL", "u"]


def test_quoted_fields(tmp_path):
    p = write(tmp_path, '"item_id","user_id","timestamp"\n"a,b","u 1",5\n')
    df = load_interactions(p)
    assert rows(df) == [("a,b", "u 1", 5)]


def test_utf8_bom_header(tmp_path):
    # files saved by spreadsheet tools often start with a UTF-8 byte-order mark
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffitem_id,user_id,timestamp\na,u,1\n".encode("utf-8"))
    assert rows(load_interactions(path)) == [("a", "u", 1)]


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "crlf.csv"
    path.write_bytes(b"item_id,user_id,timestamp\r\na,u,1\r\nb,u,2\r\n")
    assert rows(load_interactions(path)) == [("a", "u", 1), ("b", "u", 2)]


def test_moderately_large_file_loads_correctly(tmp_path):
    n = 200_000
    rng = np.random.default_rng(0)
    items = rng.integers(0, 5000, n)
    users = rng.integers(0, 20000, n)
    ts = rng.integers(0, 10**9, n)
    path = tmp_path / "big.csv"
    with open(path, "w") as f:
        f.write("user_id,item_id,timestamp\n")
        f.write("".join(f"u{u},{i:05d},{t}\n" for u, i, t in zip(users, items, ts)))
    df = load_interactions(path)
    assert len(df) == n
    assert df["timestamp"].to_numpy().tolist() == ts.tolist()
    assert df["item_id"].nunique() == len(np.unique(items))
    assert df["user_id"].nunique() == len(np.unique(users))
    assert df["item_id"].iloc[0] == f"{items[0]:05d}"  # zero-padding kept
    assert df["user_id"].iloc[-1] == f"u{users[-1]}"


# ---- bad input (SPEC §8) -----------------------------------------------------------------------


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    p = tmp_path / "nope.csv"
    with pytest.raises(PixelrecError) as err:
        load_interactions(p)
    msg = one_line(err)
    assert "nope.csv" in msg and "not found" in msg


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(PixelrecError):
        load_interactions(tmp_path)


def test_empty_file(tmp_path):
    p = write(tmp_path, "", "empty.csv")
    with pytest.raises(PixelrecError) as err:
        load_interactions(p)
    msg = one_line(err)
    assert "empty.csv" in msg and "empty" in msg


def test_header_only(tmp_path):
    p = write(tmp_path, "item_id,user_id,timestamp\n", "hdr.csv")
    with pytest.raises(PixelrecError) as err:
        load_interactions(p)
    msg = one_line(err)
    assert "hdr.csv" in msg and "no interaction rows" in msg


@pytest.mark.parametrize("missing", ["item_id", "user_id", "timestamp"])
def test_missing_column_names_file_and_column(tmp_path, missing):
    cols = [c for c in ("item_id", "user_id", "timestamp") if c != missing] + ["other"]
    p = write(tmp_path, ",".join(cols) + "\n" + ",".join(["1"] * len(cols)) + "\n", "cols.csv")
    with pytest.raises(PixelrecError) as err:
        load_interactions(p)
    msg = one_line(err)
    assert "cols.csv" in msg
    assert f"missing column(s) {missing}" in msg
    # the other required columns are not reported as missing
    for c in ("item_id", "user_id", "timestamp"):
        if c != missing:
            assert f"missing column(s) {c}" not in msg


def test_misnamed_column(tmp_path):
    p = write(tmp_path, "itemID,user_id,time\na,u,1\n", "mis.csv")
    with pytest.raises(PixelrecError) as err:
        load_interactions(p)
    msg = one_line(err)
    assert "mis.csv" in msg and "item_id" in msg and "timestamp" in msg
    assert "user_id," not in msg.split("found")[0]  # user_id is present, not listed as missing


@pytest.mark.parametrize("bad", ["abc", "1.5", "", "12:30"])
def test_non_integer_timestamp_names_the_file_line(tmp_path, bad):
    # header = line 1, first data row = line 2; the bad value is on data row 3 -> line 4
    p = write(tmp_path, f"item_id,user_id,timestamp\na,u,1\nb,u,2\nc,u,{bad}\nd,u,4\n", "ts.csv")
    with pytest.raises(PixelrecError) as err:
        load_interactions(p)
    msg = one_line(err)
    assert "ts.csv" in msg
    assert "row 4" in msg
    assert "integer" in msg


def test_non_integer_timestamp_on_first_data_row_is_line_2(tmp_path):
    p = write(tmp_path, "item_id,user_id,timestamp\na,u,abc\n", "ts.csv")
    with pytest.raises(PixelrecError, match=r"row 2\b"):
        load_interactions(p)


@pytest.mark.parametrize("col", ["item_id", "user_id"])
def test_empty_id_names_row_and_column(tmp_path, col):
    fields = {"item_id": "a", "user_id": "u", "timestamp": "5"}
    bad = dict(fields, **{col: ""})
    text = "item_id,user_id,timestamp\n" + "a,u,1\n" + f"{bad['item_id']},{bad['user_id']},{bad['timestamp']}\n"
    p = write(tmp_path, text, "ids.csv")
    with pytest.raises(PixelrecError) as err:
        load_interactions(p)
    msg = one_line(err)
    assert "ids.csv" in msg and "row 3" in msg and f"empty {col}" in msg


def test_whitespace_only_id_is_empty(tmp_path):
    p = write(tmp_path, "item_id,user_id,timestamp\n   ,u,1\n", "ws.csv")
    with pytest.raises(PixelrecError, match="row 2: empty item_id"):
        load_interactions(p)


def test_ragged_row_is_a_pixelrec_error(tmp_path):
    p = write(tmp_path, "item_id,user_id,timestamp\na,u,1\nb,u\n", "ragged.csv")
    with pytest.raises(PixelrecError) as err:
        load_interactions(p)
    assert "ragged.csv" in one_line(err)
