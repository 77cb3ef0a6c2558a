"""The browsing page of `pixelrec serve` in a real browser: headless Chromium against a real server
process on a free 127.0.0.1 port.

The page runs the actions given in its URL hash (search a user, paste a history, click a cover,
upload a copy of a cover) and records what happened on <body>: data-state, and how many cover
images loaded with a non-zero natural size (data-loaded-images) or failed (data-failed-images).
Chromium's --dump-dom hands back the DOM after the actions; --screenshot the picture.

Skipped when Chromium is not installed (`.ci/run` installs Debian's `chromium` when it can).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_browse import HOSTILE, NO_COVER, hostile_run
from fixtures_images import cold_run
from fixtures_runs import copy_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from screenshot import Server, chromium, find_chromium, page_url  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(find_chromium() is None,
                                 reason="chromium is not installed (apt-get install -y chromium; .ci/run does it)")]


class Dom(HTMLParser):
    """The dumped DOM: <body>'s attributes, the text of elements by id, and the cards of each grid."""

    def __init__(self, text: str):
        super().__init__()
        self.body: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self.cards: dict[str, list[str]] = {}  # grid id -> the item ids shown, in order
        self.images: list[dict] = []
        self.attributes: set[str] = set()  # every attribute name on any element
        self.hidden: dict[str, bool] = {}  # element id -> whether it has the hidden attribute
        self._open: list[tuple[str, str | None]] = []
        self._grid: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.attributes |= set(attrs)
        if "id" in attrs:
            self.hidden[attrs["id"]] = "hidden" in attrs
        if tag == "body":
            self.body = attrs
        if tag == "img":
            self.images.append(attrs)
        if attrs.get("id") in ("history-covers", "results", "similar"):
            self._grid = attrs["id"]
            self.cards[self._grid] = []
        if tag not in ("img", "input", "br", "meta", "link"):
            self._open.append((tag, attrs.get("id") or (attrs.get("class") == "id" and "card-id") or None))

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for _, name in self._open:
            if name and name != "card-id":
                self.texts[name] = self.texts.get(name, "") + data
        if self._open and self._open[-1][1] == "card-id" and self._grid is not None:
            self.cards[self._grid].append(data)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    return copy_run(cold_run("frozen")[0], tmp_path_factory.mktemp("browse") / "run")


def test_search_click_and_upload_in_a_real_browser(image_run, tmp_path):
    users = (image_run / "users.txt").read_text().split("\n")[:-1]
    items = (image_run / "items.txt").read_text().split("\n")[1:-1]
    user, clicked, copied = users[3], items[10], items[20]
    shot = tmp_path / "page.png"
    with Server(image_run) as server:
        history = get_json(f"{server.url}/health")  # the server answers before the browser starts
        assert history["items"] == 120
        dom = Dom(chromium(page_url(server.url, user=user, k="5", click=clicked), dump_dom=True))
        chromium(page_url(server.url, user=user, k="5"), screenshot=shot, size="1200,900")
        uploaded = Dom(chromium(page_url(server.url, **{"upload-copy": copied, "as": f"copy-{copied}", "k": "5"}),
                                dump_dom=True))
        after = get_json(f"{server.url}/health")
    # the user's history in order, then the top 5, each cover loaded
    answer_history = [items[i - 1] for i in _history_ids(image_run, user)]
    assert dom.body["data-state"] == "done", dom.texts.get("message")
    assert not dom.hidden["upload-form"] and dom.hidden["key-label"]  # open on loopback: no key needed
    assert dom.cards["history-covers"] == answer_history
    assert len(dom.cards["results"]) == 5 and not set(dom.cards["results"]) & set(answer_history)
    # the click: the item itself, then its 5 nearest
    assert dom.cards["similar"][0] == clicked and len(dom.cards["similar"]) == 6
    shown = len(answer_history) + 5 + 6
    assert int(dom.body["data-loaded-images"]) == shown and dom.body["data-failed-images"] == "0"
    # the upload: added to the run, shown with its neighbours, its original first (cosine)
    assert uploaded.body["data-state"] == "done", uploaded.texts.get("message")
    assert f"Added copy-{copied}" in uploaded.texts["message"]
    assert uploaded.cards["similar"][:2] == [f"copy-{copied}", copied]
    assert after["items"] == 121 and after["index_version"] == history["index_version"] + 1
    assert int(uploaded.body["data-loaded-images"]) == 6 and uploaded.body["data-failed-images"] == "0"
    # the screenshot shows the covers: many colours where a page of text has a few greys
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (900, 1200)
    colourful = (pixels.max(axis=2).astype(int) - pixels.min(axis=2)) > 60
    assert colourful.mean() > 0.05


def _history_ids(run: Path, user: str) -> list[int]:
    from pixelrec.runs.rundir import RunDir

    data = RunDir(run).read_data()
    return [int(i) for i in data.history(data.user_index[user], "all")]


def test_unknown_ids_hostile_ids_and_a_read_only_server_in_a_real_browser():
    run, covers = hostile_run()
    with Server(run, "--images", str(covers), "--read-only") as server:
        unknown_user = Dom(chromium(page_url(server.url, user="ghost"), dump_dom=True, budget_ms=8000))
        unknown_item = Dom(chromium(page_url(server.url, click="nosuch"), dump_dom=True, budget_ms=8000))
        raw = chromium(page_url(server.url, history=f"{NO_COVER},{HOSTILE}", k="4", click=HOSTILE), dump_dom=True)
    assert unknown_user.body["data-state"] == unknown_item.body["data-state"] == "error"
    assert "unknown user 'ghost'" in unknown_user.texts["message"]
    assert "unknown item 'nosuch'" in unknown_item.texts["message"]
    dom = Dom(raw)
    assert dom.body["data-state"] == "done", dom.texts.get("message")
    assert dom.cards["history-covers"] == [NO_COVER, HOSTILE]  # shown as text, not as markup
    assert dom.cards["similar"][0] == HOSTILE
    assert "onerror" not in dom.attributes and all(image.get("src") != "x" for image in dom.images)
    assert "&lt;img src=x onerror=alert(1)&gt;" in raw  # the id as text
    # NO_COVER has no cover: a placeholder wherever it is shown; every other cover loaded
    shown = [item for grid in ("history-covers", "results", "similar") for item in dom.cards[grid]]
    assert len(shown) == 2 + 4 + 5 and NO_COVER in shown
    assert dom.body["data-failed-images"] == dom.body["data-placeholders"] == str(shown.count(NO_COVER))
    assert dom.body["data-loaded-images"] == str(len(shown) - shown.count(NO_COVER))
    assert "does not take new covers" in dom.texts["upload-note"]  # --read-only
    assert dom.hidden["upload-form"] and dom.hidden["key-label"]  # no form, no key field

