"""Load PixelRec interaction CSVs (`item_id,user_id,timestamp`) and validate them.

Ids are kept as strings exactly as written; timestamps must be integers. Column order may differ
and extra columns are ignored. Reading goes through pyarrow, so a 4M-row file loads in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import PixelrecError

REQUIRED_COLUMNS = ("item_id", "user_id", "timestamp")


def load_interactions(path: str | os.PathLike) -> pd.DataFrame:
    """Read an interaction CSV into a DataFrame with columns item_id, user_id (strings) and timestamp (int64).

    Rows keep their file order (row i of the frame is data row i of the file, i.e. file line i + 2).
    Raises PixelrecError naming the file (and row) for a missing file, an empty file, missing
    columns, empty ids or non-integer timestamps.
    """
    path = Path(path)
    if not path.is_file():
        raise PixelrecError(f"{path}: interactions file not found")
    if path.stat().st_size == 0:
        raise PixelrecError(f"{path}: interactions file is empty (expected a header item_id,user_id,timestamp)")

    header = _read_header(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise PixelrecError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header) or 'nothing'} "
            f"(expected a header with item_id,user_id,timestamp)"
        )
    try:
        df = pd.read_csv(
            path,
            usecols=list(REQUIRED_COLUMNS),
            dtype={c: "string[pyarrow]" for c in REQUIRED_COLUMNS},
            keep_default_na=False,  # an item called "NA" or "null" is an id, not a missing value
            na_values=[],
            encoding="utf-8-sig",
            engine="pyarrow",
        )
    except Exception as exc:  # pyarrow's parse errors carry the row; keep them on one line
        raise PixelrecError(f"{path}: cannot parse CSV: {exc}") from None
    if len(df) == 0:
        raise PixelrecError(f"{path}: no interaction rows after the header")

    for col in ("item_id", "user_id"):
        empty = df[col].isna() | (df[col].str.strip() == "")
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise PixelrecError(f"{path}: row {row + 2}: empty {col}")

    raw_ts = df["timestamp"].str.strip()
    bad = ~raw_ts.str.fullmatch(r"[+-]?\d+").fillna(False).astype(bool)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise PixelrecError(
            f"{path}: row {row + 2}: timestamp {df['timestamp'].iloc[row]!r} is not an integer"
        )
    try:
        ts = raw_ts.astype("int64")
    except (OverflowError, ValueError):
        raise PixelrecError(f"{path}: a timestamp does not fit a 64-bit integer") from None
    return pd.DataFrame(
        {
            "item_id": df["item_id"],  # pyarrow-backed strings: no per-row Python objects
            "user_id": df["user_id"],
            "timestamp": ts.to_numpy(dtype=np.int64),  # exact: never through float
        }
    )


def _read_header(path: Path) -> list[str]:
    with open(path, "r", encoding="utf-8-sig", errors="replace") as f:
        first = f.readline()
    return [c.strip().strip('"') for c in first.strip().split(",") if c.strip()]
