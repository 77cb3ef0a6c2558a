"""Load PixelRec interaction CSVs (`item_id,user_id,timestamp`) and validate them.

Ids are kept as strings exactly as written and must pass the id rule (`data.ids`: printable, one
line, no path separators, not reserved); timestamps must be integers. Column order may differ
and extra columns are ignored. Reading goes through pyarrow, so a 4M-row file loads in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import PixelrecError
from .ids import RESERVED_IDS, SAFE_ASCII_ID, MAX_ID_BYTES, id_problem, shown

REQUIRED_COLUMNS = ("item_id", "user_id", "timestamp")


def load_interactions(path: str | os.PathLike) -> pd.DataFrame:
    """Read an interaction CSV into a DataFrame with columns item_id, user_id (strings) and timestamp (int64).

    Rows keep their file order (row i of the frame is data row i of the file, i.e. file line i + 2).
    Raises PixelrecError naming the file (and row) for a missing file, an empty file, missing
    columns, empty ids, ids the id rule refuses (`data.ids`) or non-integer timestamps.
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
        _check_ids(path, df[col], col)

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


def _check_ids(path: Path, ids: pd.Series, col: str) -> None:
    """Refuse the first row whose id breaks the id rule, naming the row and showing the id with repr().

    Distinct ids are checked: plain ASCII ones by one vectorised regex, the others one by one.
    """
    unique = pd.Series(ids.unique(), dtype=ids.dtype)
    plain = (unique.str.fullmatch(SAFE_ASCII_ID).fillna(False).astype(bool)
             & (unique.str.len() <= MAX_ID_BYTES).fillna(False).astype(bool)  # ASCII: characters = bytes
             & ~unique.isin(RESERVED_IDS)).to_numpy(dtype=bool)
    bad = {name for name in unique[~plain].tolist() if id_problem(name) is not None}
    if not bad:
        return
    row = int(np.flatnonzero(ids.isin(bad).to_numpy())[0])
    name = ids.iloc[row]
    raise PixelrecError(f"{path}: row {row + 2}: {col} {shown(name)} {id_problem(name)}")


def _read_header(path: Path) -> list[str]:
    with open(path, "r", encoding="utf-8-sig", errors="replace") as f:
        first = f.readline()
    return [c.strip().strip('"') for c in first.strip().split(",") if c.strip()]
