"""Per-user interaction sequences and the leave-one-out split (docs/protocol.md).

`SequenceData` holds every kept user's items in time order as one CSR structure:
``items[offsets[u]:offsets[u + 1]]`` is user u's sequence of item indices. Item index 0 is
padding; real items are 1..num_items, in the order of the sorted item id strings.

Split, per user: last item = test target, second last = validation target, the rest = training.
Users with fewer than `min_interactions` (default 3) interactions cannot be split; they are dropped
and counted (`dropped_users`, `dropped_interactions`), never silently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import pandas as pd

from ..errors import PixelrecError
from .ids import PAD
from .interactions import load_interactions

Split = Literal["valid", "test"]


@dataclass
class SequenceData:
    item_ids: np.ndarray  # [num_items + 1] object (str); item_ids[0] == PAD
    user_ids: np.ndarray  # [num_users] object (str)
    offsets: np.ndarray  # [num_users + 1] int64
    items: np.ndarray  # [num_interactions] int64, per user in time order
    dropped_users: int = 0
    dropped_interactions: int = 0
    dropped_items: int = 0  # items seen only in dropped users' rows
    source: str = ""

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        """Real items (excluding padding); valid indices are 1..num_items."""
        return len(self.item_ids) - 1

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_interactions(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    # ---- lookups -----------------------------------------------------------------------------
    @cached_property
    def item_index(self) -> dict[str, int]:
        return {str(t): i for i, t in enumerate(self.item_ids)}

    @cached_property
    def user_index(self) -> dict[str, int]:
        return {str(t): u for u, t in enumerate(self.user_ids)}

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    # ---- the split ---------------------------------------------------------------------------
    def history(self, user: int, split: Split | Literal["all"]) -> np.ndarray:
        """Items seen before the split's target ('all' = the whole sequence, for serving)."""
        seq = self.sequence(user)
        return {"valid": seq[:-2], "test": seq[:-1], "all": seq}[split]

    def targets(self, split: Split) -> np.ndarray:
        """[num_users] target item of every user for the split."""
        back = {"valid": 2, "test": 1}[split]
        return self.items[self.offsets[1:] - back]

    def train_sequence(self, user: int) -> np.ndarray:
        return self.sequence(user)[:-2]

    @cached_property
    def train_counts(self) -> np.ndarray:
        """[num_items + 1] number of training interactions of each item (index 0 unused)."""
        mask = np.ones(len(self.items), dtype=bool)
        mask[self.offsets[1:] - 1] = False  # test targets
        mask[self.offsets[1:] - 2] = False  # validation targets
        return np.bincount(self.items[mask], minlength=self.num_items + 1)

    # ---- identity ----------------------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the vocabularies and the ordered sequences: equal iff the runs see the same data."""
        h = hashlib.sha256()
        h.update("\n".join(map(str, self.item_ids)).encode())
        h.update(b"\0")
        h.update("\n".join(map(str, self.user_ids)).encode())
        h.update(b"\0")
        h.update(np.ascontiguousarray(self.offsets, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.items, dtype=np.int64).tobytes())
        return h.hexdigest()

    def summary(self) -> dict:
        return {
            "source": self.source,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "dropped_users": self.dropped_users,
            "dropped_interactions": self.dropped_interactions,
            "dropped_items": self.dropped_items,
            "fingerprint": self.fingerprint,
        }


def build_sequences(
    df: pd.DataFrame,
    min_interactions: int = 3,
    source: str = "",
    item_vocab: np.ndarray | None = None,
) -> SequenceData:
    """Sort each user's interactions by timestamp (stable: ties keep file order) and split-ready CSR.

    `item_vocab` (with PAD at 0) fixes the item indices, e.g. to evaluate a trained run on new
    interactions; rows whose item is not in it raise PixelrecError naming the item.
    """
    if min_interactions < 3:
        raise PixelrecError("min_interactions must be at least 3 (train, validation and test items)")
    # factorize hashes the ids once and sorts only the unique values (fast for millions of rows)
    user_codes, user_ids = pd.factorize(df["user_id"], sort=True)
    item_codes, item_uniques = pd.factorize(df["item_id"], sort=True)
    item_uniques = np.asarray(item_uniques, dtype=object)
    ts = df["timestamp"].to_numpy(dtype=np.int64)
    order = np.lexsort((np.arange(len(df)), ts, user_codes))  # user, then time, then file order
    user_codes = user_codes[order]
    counts = np.bincount(user_codes, minlength=len(user_ids))
    keep_user = counts >= min_interactions
    keep_row = keep_user[user_codes]
    kept_codes = item_codes[order][keep_row]

    if item_vocab is None:
        used = np.zeros(len(item_uniques), dtype=bool)
        used[kept_codes] = True
        item_ids = np.concatenate([np.array([PAD], dtype=object), item_uniques[used]])
        remap = np.cumsum(used) - 1  # unique position -> vocabulary position (where used)
        dropped_items = int((~used).sum())
    else:
        item_ids = np.asarray(item_vocab, dtype=object)
        remap = pd.Index(item_ids[1:].astype(str)).get_indexer(item_uniques.astype(str))
        dropped_items = 0
        unknown = remap[kept_codes] < 0
        if unknown.any():
            bad = item_uniques[kept_codes[int(np.flatnonzero(unknown)[0])]]
            raise PixelrecError(f"{source or 'interactions'}: item {bad!r} is not in the run's item vocabulary")
    codes = remap[kept_codes]

    kept_counts = counts[keep_user]
    offsets = np.zeros(len(kept_counts) + 1, dtype=np.int64)
    np.cumsum(kept_counts, out=offsets[1:])
    return SequenceData(
        item_ids=item_ids,
        user_ids=np.asarray(user_ids, dtype=object)[keep_user],
        offsets=offsets,
        items=(codes + 1).astype(np.int64),
        dropped_users=int((~keep_user).sum()),
        dropped_interactions=int((~keep_row).sum()),
        dropped_items=int(dropped_items),
        source=source,
    )


def load_sequences(path: str, min_interactions: int = 3) -> SequenceData:
    """Load an interaction CSV and build its sequences."""
    data = build_sequences(load_interactions(path), min_interactions=min_interactions, source=str(path))
    if data.num_users == 0:
        raise PixelrecError(
            f"{path}: no user has at least {min_interactions} interactions, so nothing can be split "
            f"({data.dropped_users} users dropped)"
        )
    return data
