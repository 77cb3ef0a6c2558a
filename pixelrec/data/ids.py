"""The one rule for item and user ids: what may enter a run.

Every id that enters a run passes `id_problem` (interactions CSVs, cover file names, LMDB keys,
`index --add-images`, uploads, `synth --item-prefix`). An id is a printable, single-line string
that can also be a file name (an added item's cover is kept under its name):

- not empty, at most `MAX_ID_BYTES` bytes of UTF-8 (a file name's limit), valid UTF-8;
- every character printable as Python's `str.isprintable` defines it: no control characters
  (newline, carriage return, tab, NUL, ...), no Unicode format characters (category Cf: zero-width
  space and joiners, right-to-left overrides, BOM), no surrogates, private-use or unassigned code
  points, no line or paragraph separators, and no white space other than the ASCII space;
- no path separator (`/`, `\\`), does not start with a dot (`.`, `..`, hidden files) and does not
  start or end with a space;
- not one of the reserved names (`RESERVED_IDS`): `[PAD]` (item index 0) and `[unused]` (an
  index id that holds no item).

Files of names (a run's items.txt / users.txt, an index version's added_items.jsonl) are checked
with the same rule when read, so a damaged or hand-made run is refused in one line.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

from ..errors import PixelrecError

PAD = "[PAD]"
"""The name of item index 0 (padding), first line of a run's items.txt."""

UNUSED_NAME = "[unused]"
"""The name of an index id that holds no item (ids are never reused, so skipped ones keep it)."""

RESERVED_IDS = (PAD, UNUSED_NAME)

MAX_ID_BYTES = 255
"""Longest id in bytes of UTF-8: a file name's limit on common file systems."""

_SEPARATORS = "/\\"
SAFE_ASCII_ID = r"[!-\-0-\[\]-~]([ -\.0-\[\]-~]*[!-\.0-\[\]-~])?"
"""A regex of ids made of plain ASCII that pass the rule (apart from length and reserved names):
a fast path for checking millions of ids; anything else goes through `id_problem`."""
_SAFE = re.compile(SAFE_ASCII_ID)


def id_problem(name: object) -> str | None:
    """Why `name` cannot be an id (a short phrase to follow the quoted name), or None when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if len(name) <= MAX_ID_BYTES and _SAFE.fullmatch(name) and name not in RESERVED_IDS:
        return None  # plain ASCII: the common case, decided by one regex
    if not name:
        return "is empty"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    bad = next((c for c in name if not c.isprintable()), None)
    if bad is not None:
        return f"holds the character {_describe(bad)} (control, format and separator characters are refused)"
    if any(c in name for c in _SEPARATORS):
        return "holds a slash or a backslash (path separators)"
    if name.startswith("."):
        return "starts with a dot"
    if name != name.strip(" "):
        return "starts or ends with a space"
    if name in RESERVED_IDS:
        return f"is reserved (pixelrec uses {' and '.join(RESERVED_IDS)} itself)"
    if size > MAX_ID_BYTES:
        return f"is {size} bytes long (at most {MAX_ID_BYTES} bytes of UTF-8: ids become file names)"
    return None


def first_bad_id(names: Sequence[str]) -> tuple[int, str] | None:
    """(position, problem) of the first of `names` the rule refuses, or None. Plain ASCII names take
    a regex fast path, so checking a million names costs well under a second."""
    for position, name in enumerate(names):
        problem = id_problem(name)
        if problem is not None:
            return position, problem
    return None


def check_id(name: object, what: str, where: str) -> str:
    """`name` when it may be an id, else a PixelrecError: "WHERE: WHAT 'name' PROBLEM"."""
    problem = id_problem(name)
    if problem is not None:
        raise PixelrecError(f"{where}: {what} {shown(name)} {problem}")
    return name  # type: ignore[return-value]


def shown(name: object) -> str:
    """`name` quoted for one line of output: its repr (which escapes every character the rule refuses),
    shortened when long."""
    if isinstance(name, str) and len(name) > 80:
        return f"{name[:60]!r}... ({len(name)} characters)"
    return repr(name)


def _describe(c: str) -> str:
    name = unicodedata.name(c, None)
    code = f"U+{ord(c):04X}"
    return f"{code} {name}" if name else code
