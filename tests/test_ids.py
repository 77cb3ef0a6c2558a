"""One id rule everywhere (`pixelrec.data.ids`): the names a hostile user would try are refused at
every door (interactions CSV, covers folders, LMDB keys, uploads, synth prefixes) and in every
file of names a run keeps (items.txt, users.txt; added_items.jsonl is covered in test_new_items).
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures_runs import copy_run, handmade_run, invoke, one_error_line
from pixelrec.data.ids import MAX_ID_BYTES, PAD, RESERVED_IDS, UNUSED_NAME, first_bad_id, id_problem, shown
from pixelrec.data.interactions import load_interactions
from pixelrec.data.sequences import PAD as SEQUENCES_PAD
from pixelrec.errors import PixelrecError
from pixelrec.runs.rundir import RunDir
from pixelrec.runs.serving.engine import ServeError
from pixelrec.runs.serving.uploads import Cover, check_item_id

# The probe's names, with the words the refusal must hold.
HOSTILE = {
    "n1\nn2": "U+000A",
    "a\rb": "U+000D",
    "a\x00b": "U+0000",
    "a\tb": "U+0009",
    "a/b": "slash",
    "a\\b": "backslash",
    "..": "dot",
    ".": "dot",
    ".hidden": "dot",
    "[PAD]": "reserved",
    "[unused]": "reserved",
    "x" * 300: "300 bytes",
    "\u00e9" * 130: "260 bytes",  # 130 characters, 260 bytes of UTF-8
    "evil\u202egpj.exe": "RIGHT-TO-LEFT OVERRIDE",  # Unicode format characters (Cf) are refused too
    "zero\u200bwidth": "ZERO WIDTH SPACE",
    "bom\ufeff": "ZERO WIDTH NO-BREAK SPACE",
    "line\u2028sep": "LINE SEPARATOR",
    "nb\u00a0sp": "NO-BREAK SPACE",
    " lead": "space",
    "trail ": "space",
    "": "empty",
    "\udcff": "UTF-8",  # a file name that was not UTF-8, as os.listdir returns it
}
ACCEPTED = ["i00001", "a b", "a,b", "N.A", "caf\u00e9", "\u5546\u54c1-7", "x" * MAX_ID_BYTES, "[PAD]x", "#1"]


@pytest.mark.parametrize("name", list(HOSTILE), ids=[repr(n)[:20] for n in HOSTILE])
def test_hostile_names_are_refused_with_the_reason(name):
    problem = id_problem(name)
    assert problem is not None and HOSTILE[name] in problem
    assert "\n" not in problem and "\n" not in shown(name)


@pytest.mark.parametrize("name", ACCEPTED)
def test_ordinary_names_pass(name):
    assert id_problem(name) is None


def test_reserved_names_live_in_one_place():
    assert RESERVED_IDS == (PAD, UNUSED_NAME) == ("[PAD]", "[unused]") and SEQUENCES_PAD is PAD


def test_first_bad_id_finds_the_first_refused_name_among_many():
    names = [f"u{k}" for k in range(100_000)]
    assert first_bad_id(names) is None
    names[70_000], names[90_000] = "caf\u00e9\u200b", "[PAD]"
    position, problem = first_bad_id(names)
    assert position == 70_000 and "ZERO WIDTH SPACE" in problem


@pytest.mark.parametrize("column", ["item_id", "user_id"])
@pytest.mark.parametrize("name", ["n1\nn2", "a\rb", "a\x00b", "a\tb", "a/b", "..", "[PAD]", "[unused]", "x" * 300,
                                  "rtl\u202ex", "zw\u200bx"], ids=repr)
def test_interactions_with_a_hostile_id_are_refused_naming_the_row(tmp_path, column, name):
    quoted = '"' + name + '"'
    bad_row = f"{quoted},u2,3" if column == "item_id" else f"i3,{quoted},3"
    path = tmp_path / "inter.csv"
    path.write_text(f"item_id,user_id,timestamp\ni0,u0,1\ni1,u1,2\n{bad_row}\n", encoding="utf-8")
    with pytest.raises(PixelrecError) as exc:
        load_interactions(path)
    message = str(exc.value)
    assert "\n" not in message
    assert f"{path}: row 4: {column} {shown(name)}" in message and id_problem(name) in message


def test_uploads_use_the_same_rule():
    for name, needle in HOSTILE.items():
        with pytest.raises(ServeError) as exc:
            check_item_id(Cover(name, f"{name}.png", b""))
        assert exc.value.status == 422 and needle in str(exc.value)
    check_item_id(Cover("caf\u00e9", "caf\u00e9.png", b""))




def test_synth_refuses_a_prefix_that_makes_invalid_ids(tmp_path):
    one_error_line(invoke(["synth", tmp_path / "s", "--item-prefix", "\U0001f600" * 100]),
                   "--item-prefix", "407 bytes", "at most 255")
    one_error_line(invoke(["synth", tmp_path / "s", "--item-prefix", "a\u200b"]), "--item-prefix", "must not contain")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("file, line, name, needle", [
    ("items.txt", 3, "rtl\u202ex", "RIGHT-TO-LEFT OVERRIDE"),
    ("items.txt", 2, "[unused]", "reserved"),
    ("items.txt", 1, "i0", "not [PAD]"),
    ("users.txt", 2, "a\tb", "U+0009"),
    ("users.txt", 1, "..", "dot"),
])
def test_a_run_whose_names_were_tampered_with_is_refused_in_one_line(tmp_path, file, line, name, needle):
    run = copy_run(handmade_run()[0], tmp_path / "run")
    path = run / file
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[line - 1] = name
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(PixelrecError) as exc:
        RunDir(run).read_data()
    assert "\n" not in str(exc.value) and file in str(exc.value) and needle in str(exc.value)
    one_error_line(invoke(["retrieve", run, "--user", "u1"]), file, needle)


def test_a_truncated_names_file_is_refused(tmp_path):
    run = copy_run(handmade_run()[0], tmp_path / "run")
    path = run / "users.txt"
    path.write_text(path.read_text(encoding="utf-8").rstrip("\n"), encoding="utf-8")
    with pytest.raises(PixelrecError, match="last line is not terminated"):
        RunDir(run).read_data()


def test_writing_a_run_refuses_names_the_rule_refuses(tmp_path):
    data = RunDir(handmade_run()[0]).read_data()
    data.user_ids = np.array(list(data.user_ids[:-1]) + ["n1\nn2"], dtype=object)
    with pytest.raises(PixelrecError, match=r"users.txt: id 'n1\\nn2' holds the character U\+000A"):
        RunDir(tmp_path / "run").write_data(data)
    assert not (tmp_path / "run" / "users.txt").exists()
