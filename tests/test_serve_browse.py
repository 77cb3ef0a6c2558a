"""`pixelrec serve`'s covers, browsing page, cosine similarity and offline API docs, and
`retrieve --html` (in-process; the page in a real browser is tests/test_browse_page.py).

Runs: the frozen-tower run of fixtures_images (covers recorded through its cache), and the id run
of fixtures_browse whose item ids hold HTML (covers given with --images).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from fixtures_browse import AMPERSAND, HOSTILE, NO_COVER, hostile_run
from fixtures_images import cold_dataset, cold_run
from fixtures_runs import copy_run, invoke
from pixelrec.runs.rundir import RunDir
from pixelrec.runs.serving.app import STATIC_DIR
from pixelrec.runs.trained import read_added_items
from test_serve import assert_refused, items_of, served, users_of


@pytest.fixture(scope="module")
def image_run():
    return cold_run("frozen")[0]


def cover_url(item: str, **params) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"/items/{quote(item, safe='')}/cover" + (f"?{query}" if query else "")


def mean_colour(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64).mean(axis=(0, 1))


# ------------------------------------------------------------------------------------------ covers
def test_cover_is_the_items_image_as_jpeg_with_caching_headers(image_run):
    item = items_of(image_run)[3]
    original = (cold_dataset().covers / f"{item}.jpg").read_bytes()
    with served(image_run) as client:
        full = client.get(cover_url(item))
        assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(full.content)).size == Image.open(io.BytesIO(original)).size == (32, 32)
        assert np.abs(mean_colour(full.content) - mean_colour(original)).max() < 4  # the same picture
        thumb = client.get(cover_url(item, size=16))
        assert Image.open(io.BytesIO(thumb.content)).size == (16, 16)
        assert np.abs(mean_colour(thumb.content) - mean_colour(original)).max() < 6
        etag = thumb.headers["etag"]
        assert etag != full.headers["etag"] and "max-age" in thumb.headers["cache-control"]
        again = client.get(cover_url(item, size=16), headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        other = client.get(cover_url(items_of(image_run)[4], size=16))
        assert other.headers["etag"] != etag


def test_bad_cover_requests_are_4xx_naming_the_item(image_run):
    item = items_of(image_run)[0]
    with served(image_run) as client:
        assert_refused(client.get(cover_url("nosuch")), 404, "'nosuch'")
        assert_refused(client.get(cover_url(item, size=8)), 422, "size 8", "16 to 1024")
        assert_refused(client.get(cover_url(item, size=5000)), 422, "size 5000")
        assert_refused(client.get(cover_url(item, size="big")), 422, "size")
        for hostile in ("../../etc/passwd", "..", ".hidden", "a\\b", "x\x00y", "/etc/passwd", "covers/../x"):
            every_byte = "".join(f"%{b:02X}" for b in hostile.encode())  # no client may normalise it away
            assert_refused(client.get(f"/items/{every_byte}/cover"), 422, "item id")


def test_id_run_covers_come_from_images_or_are_404(tmp_path):
    run, covers = hostile_run()
    with served(run) as client:  # an id run records no covers
        assert_refused(client.get(cover_url("w01")), 404, "'w01'", "--images")
        assert "none" in client.get("/run").json()["covers"]
    with served(run, images=str(covers)) as client:
        for item in ("w01", HOSTILE, AMPERSAND):
            response = client.get(cover_url(item, size=16))
            assert response.status_code == 200, response.text
            expected = mean_colour((covers / f"{item}.png").read_bytes())
            assert np.abs(mean_colour(response.content) - expected).max() < 6
        assert_refused(client.get(cover_url(NO_COVER)), 404, f"'{NO_COVER}'", "has no cover")
    # a cover that is a link to a file outside the folder is not served
    linked = tmp_path / "covers"
    shutil.copytree(covers, linked)
    secret = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret)
    os.symlink(secret, linked / f"{NO_COVER}.png")
    with served(run, images=str(linked)) as client:
        assert_refused(client.get(cover_url(NO_COVER)), 404, f"'{NO_COVER}'")
        assert client.get(cover_url("w01")).status_code == 200


def test_added_items_have_their_uploaded_cover(image_run, tmp_path):
    run = copy_run(image_run, tmp_path / "run")
    source = cold_dataset().covers / f"{items_of(run)[7]}.jpg"
    with served(run) as client:
        added = client.post("/items", files=[("covers", ("fresh-1.jpg", source.read_bytes()))])
        assert added.status_code == 201, added.text
        response = client.get(cover_url("fresh-1", size=32))
        assert response.status_code == 200
        assert np.abs(mean_colour(response.content) - mean_colour(source.read_bytes())).max() < 4
        assert (run / "added" / "covers" / f"{added.json()['added'][0]['index_id']}.jpg").is_file()


# -------------------------------------------------------------------------------------- similarity
def test_similar_is_by_cosine_and_a_copy_finds_its_original_first(image_run, tmp_path):
    run = copy_run(image_run, tmp_path / "run")
    items = items_of(run)
    originals = [items[5], items[40], items[90]]
    files = [("covers", (f"copy-{item}.jpg", (cold_dataset().covers / f"{item}.jpg").read_bytes()))
             for item in originals]
    with served(run) as client:
        assert client.post("/items", files=files).status_code == 201
        index_dir = RunDir(run).published().index_dir
        vectors, ids = np.load(index_dir / "item_vectors.npy"), np.load(index_dir / "item_ids.npy")
        every = items + read_added_items(index_dir)  # index id i is every[i - 1]
        names = {name: i for i, name in enumerate(every, 1)}
        for original in originals:
            answer = client.get(f"/items/copy-{original}/similar", params={"k": 5}).json()
            assert answer["metric"] == "cosine" and answer["items"][0] == original, answer
            assert answer["scores"][0] > 0.999 and answer["item_warm"] is False
            ip = client.get(f"/items/copy-{original}/similar", params={"k": 5, "metric": "ip"}).json()
            assert ip["metric"] == "ip" and len(ip["items"]) == 5
        # the cosine scores, computed here from the stored vectors
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        query = unit[list(ids).index(names[items[2]])]
        answer = client.get(f"/items/{items[2]}/similar", params={"k": 6}).json()
        by_id = {int(i): float(u @ query) for i, u in zip(ids, unit)}
        top = sorted((i for i in by_id if i != names[items[2]]), key=lambda i: (-by_id[i], i))[:6]
        assert answer["items"] == [every[i - 1] for i in top]
        assert answer["scores"] == pytest.approx([by_id[i] for i in top], abs=1e-5)
        assert_refused(client.get(f"/items/{items[2]}/similar", params={"metric": "l2"}), 422, "'l2'", "cosine")


def test_answers_say_which_items_are_warm(image_run):
    data = cold_dataset()
    cold = set(data.cold_item_ids)
    with served(image_run) as client:
        answer = client.post("/recommend", json={"user_id": users_of(image_run)[0], "k": 120 - 15}).json()
        assert len(answer["warm"]) == len(answer["items"])
        flags = dict(zip(answer["items"], answer["warm"]))
        assert any(item in cold for item in flags)
        assert all(flags[item] is (item not in cold) for item in flags)


# --------------------------------------------------------------------------------- summary, pages
def test_run_summary(image_run):
    results = json.loads((image_run / "results.json").read_text())
    with served(image_run) as client:
        run = client.get("/run").json()
    assert (run["model"], run["tower"], run["encoder"], run["users"], run["items"]) == \
        ("sasrec", "frozen", "pixelrec-tiny-vit", 400, 120)
    assert run["test"]["overall"] == results["overall"] and run["ingestion"] == "open" and run["image_tower"]
    assert str(cold_dataset().covers) in run["covers"]
    with served(image_run, read_only=True) as client:
        assert client.get("/run").json()["ingestion"] == "off"


class _References(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


@pytest.mark.parametrize("page", ["/", "/docs", "/redoc"])
def test_pages_load_every_asset_from_the_server_itself(image_run, page):
    with served(image_run) as client:
        response = client.get(page)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        parser = _References()
        parser.feed(response.text)
        scripts = re.findall(r"url: '([^']*)'", response.text) + re.findall(r'spec-url="([^"]*)"', response.text)
        urls = [u for u in parser.urls + scripts if not u.startswith(("data:", "#"))]
        assert len(urls) >= 2, urls
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), f"{page} refers off-host: {url}"
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 0, url
        assert "cdn" not in response.text.lower() and "fonts.googleapis" not in response.text


def test_page_script_inserts_text_never_html():
    script = (STATIC_DIR / "browse.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert "textContent" in script


# ----------------------------------------------------------------------------------- retrieve --html
class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[dict] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_retrieve_html_embeds_covers_and_escapes_ids(tmp_path):
    run, covers = hostile_run()
    out = tmp_path / "page.html"
    result = invoke(["retrieve", str(run), "--history", json.dumps([NO_COVER, HOSTILE, AMPERSAND]), "--k", "4",
                     "--html", str(out), "--images", str(covers)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    page = _Page()
    page.feed(text)
    assert any(HOSTILE in t for t in page.text) and any(AMPERSAND in t for t in page.text)
    assert len(page.images) == 2 + 4  # the history's two covers (NO_COVER has none), the 4 results'
    for image in page.images:
        assert image["src"].startswith("data:image/jpeg;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1])))
        assert max(picture.size) <= 112
    assert {i["alt"] for i in page.images} >= {HOSTILE, AMPERSAND}
    assert text.count('class="ph"') >= 1  # NO_COVER's placeholder


def test_retrieve_html_for_a_users_file(image_run, tmp_path):
    users = users_of(image_run)[:2]
    listing = tmp_path / "users.txt"
    listing.write_text("\n".join(users + ["ghost"]) + "\n")
    out = tmp_path / "users.html"
    result = invoke(["retrieve", str(image_run), "--users", str(listing), "--k", "3", "--html", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 unknown user ids: ghost" in result.output
    page = _Page()
    page.feed(out.read_text())
    assert [t for t in page.text if t.startswith("user ")] == [f"user {u} " for u in users]
    history = sum(len(json.loads(invoke(["retrieve", str(image_run), "--user", u, "--json"]).output)["history"])
                  for u in users)
    assert len(page.images) == history + 2 * 3
