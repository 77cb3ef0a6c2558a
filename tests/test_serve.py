"""`pixelrec serve`: the HTTP API over a loaded run (pixelrec/runs/serving).

In-process through FastAPI's TestClient (tiny runs from fixtures_runs / fixtures_images), plus one
real `pixelrec serve` process on a free 127.0.0.1 port for the command line, a port in use and
clients that go away mid-request. Tests that add covers work on a copy of the run.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from fixtures_images import cold_run, new_covers
from fixtures_runs import assert_one_line_error, cli_env, copy_run, invoke, pixelrec_cmd, trained_run
from pixelrec.index.faiss_index import ItemIndex
from pixelrec.runs.item_index import add_images_to_run
from pixelrec.runs.retrieve import retrieve_one
from pixelrec.runs.rundir import RunDir
from pixelrec.runs.serving.app import create_app
from pixelrec.runs.serving.batching import MicroBatcher
from pixelrec.runs.serving.config import ServeConfig


@contextmanager
def served(run_dir, base_url: str = "http://127.0.0.1:8000", **settings):
    """A TestClient on a fresh app for `run_dir` (lifespan started: batcher and manifest follower),
    sending requests as a client of 127.0.0.1:8000 would (the Host header is checked on loopback)."""
    settings.setdefault("poll_s", 0)
    with TestClient(create_app(ServeConfig(str(run_dir), **settings)), base_url=base_url) as client:
        yield client


def users_of(run_dir) -> list[str]:
    return (Path(run_dir) / "users.txt").read_text().split("\n")[:-1]


def items_of(run_dir) -> list[str]:
    return (Path(run_dir) / "items.txt").read_text().split("\n")[1:-1]


def cover_files(names: list[str], rename=lambda stem: stem) -> list[tuple[str, tuple[str, bytes]]]:
    """Multipart `covers` parts of new_covers() files, each sent under the name rename(stem) + .jpg."""
    return [("covers", (f"{rename(Path(n).stem)}.jpg", (new_covers() / n).read_bytes())) for n in names]


def new_cover_names() -> list[str]:
    return sorted(p.name for p in new_covers().iterdir())


def assert_refused(response, status: int, *needles: str) -> str:
    """A JSON error of `status` whose one-line detail holds every needle, and no traceback."""
    assert response.status_code == status, (response.status_code, response.text)
    assert "Traceback" not in response.text and 'File "' not in response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail, detail
    for needle in needles:
        assert needle in detail, (needle, detail)
    return detail


def same_as_retrieve(answer: dict, expected) -> None:
    assert answer["items"] == expected.items
    assert answer["scores"] == expected.scores
    assert answer["history"] == expected.history


@pytest.fixture(scope="module")
def id_run() -> Path:
    return trained_run()[0]


@pytest.fixture
def image_run(tmp_path) -> Path:
    return copy_run(cold_run("frozen")[0], tmp_path / "run")


# ------------------------------------------------------------------------------------ queries
@pytest.mark.parametrize("window_ms", [0, 5])
def test_recommend_equals_retrieve_for_users_and_histories(id_run, window_ms):
    users, items = users_of(id_run), items_of(id_run)
    long_history = items[:30]  # longer than the model's max_len (8): truncated for the tower, all excluded
    queries = [{"user_id": users[0]}, {"user_id": users[17], "k": 7}, {"history": items[3:5], "k": 4},
               {"history": long_history, "k": 12}, {"history": [items[9]], "k": 80 - 1}]
    with served(id_run, batch_window_ms=window_ms) as client:
        for query in queries:
            answer = client.post("/recommend", json=query).json()
            expected = retrieve_one(str(id_run), user=query.get("user_id"), history=query.get("history"),
                                    k=query.get("k", 10))
            same_as_retrieve(answer, expected)
        truncated = client.post("/recommend", json={"history": long_history}).json()
        assert truncated["history_truncated"] is True and truncated["history_used"] == 8
        assert not set(truncated["items"]) & set(long_history)  # the whole history is still excluded
        short = client.post("/recommend", json={"history": items[3:5]}).json()
        assert short["history_truncated"] is False and short["history_used"] == 2
        batch = client.post("/recommend/batch", json={"queries": queries}).json()["results"]
        singles = [client.post("/recommend", json=q).json() for q in queries]
        assert batch == singles


def test_recommend_equals_the_cli(id_run):
    user, items = users_of(id_run)[42], items_of(id_run)
    with served(id_run) as client:
        for args, query in ((["--user", user], {"user_id": user, "k": 6}),
                            (["--history", json.dumps(items[10:14])], {"history": items[10:14], "k": 6})):
            res = invoke(["retrieve", id_run, *args, "--k", "6", "--json"])
            assert res.exit_code == 0, res.output
            cli = json.loads(res.output)
            answer = client.post("/recommend", json=query).json()
            assert (answer["items"], answer["scores"]) == (cli["items"], cli["scores"])


def test_concurrent_requests_are_micro_batched_with_the_same_answers(id_run):
    users = users_of(id_run)[:48]
    expected = {u: retrieve_one(str(id_run), user=u, k=5) for u in users}
    with served(id_run, batch_window_ms=20) as client:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda u: client.post("/recommend", json={"user_id": u, "k": 5}).json(), users))
        stats = client.get("/stats").json()
    for user, answer in zip(users, answers):
        same_as_retrieve(answer, expected[user])
    assert stats["queries"] == len(users) and stats["batches"] < len(users) and stats["mean_batch_size"] > 1


def test_micro_batcher_keeps_requests_apart_and_survives_cancelled_ones():
    calls: list[list[int]] = []

    def compute(queries: list[int]) -> list[int]:
        calls.append(list(queries))
        return [q * 10 for q in queries]

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(compute, pool, window_s=0.05, max_batch=100)
            gone = asyncio.ensure_future(batcher.submit([99]))
            tasks = [asyncio.ensure_future(batcher.submit([i, i + 1])) for i in range(0, 20, 2)]
            await asyncio.sleep(0)
            gone.cancel()  # its client went away while it waited
            assert await asyncio.gather(*tasks) == [[i * 10, (i + 1) * 10] for i in range(0, 20, 2)]
            assert await batcher.submit([7]) == [70]
            await batcher.close()

    asyncio.run(main())
    assert len(calls[0]) == 21 and calls[-1] == [7]  # one batch for all eleven requests, then one more


def test_similar_items_are_the_nearest_item_vectors(id_run):
    items = items_of(id_run)
    index = ItemIndex.load(RunDir(id_run).published().index_dir)
    with served(id_run, batch_window_ms=0) as client:
        for position in (1, 40):
            answer = client.get(f"/items/{items[position - 1]}/similar", params={"k": 6, "metric": "ip"}).json()
            scores, ids = index.search(index.reconstruct(np.array([position])), 6, exclude=[np.array([position])])
            assert answer["items"] == [items[i - 1] for i in ids[0]]
            assert answer["scores"] == [round(float(s), 6) for s in scores[0]]
            assert items[position - 1] not in answer["items"]


def test_health_stats_and_openapi(id_run):
    with served(id_run) as client:
        health = client.get("/health").json()
        assert health == {"status": "ok", "run_dir": str(id_run), "items": 80,
                          "index_version": RunDir(id_run).published().version, "image_tower": False,
                          "ingestion": "open"}
        for user in users_of(id_run)[:3]:
            client.post("/recommend", json={"user_id": user})
        client.post("/recommend/batch", json={"queries": [{"user_id": u} for u in users_of(id_run)[:4]]})
        client.post("/recommend", json={"user_id": "nobody"})
        stats = client.get("/stats").json()
        assert (stats["items"], stats["users"], stats["requests"], stats["queries"], stats["refused"]) == (80, 200, 4, 7, 1)
        assert 0 < stats["latency_ms"]["p50"] <= stats["latency_ms"]["p99"] and stats["latency_ms"]["window"] == 4
        assert client.get("/docs").status_code == 200
        schema = client.get("/openapi.json").json()
        assert {"/recommend", "/recommend/batch", "/items/{item_id}/similar", "/items", "/health",
                "/stats"} <= set(schema["paths"])
        assert {"RecommendRequest", "RecommendResponse", "AddItemsResponse"} <= set(schema["components"]["schemas"])


# ------------------------------------------------------------------------------------ bad input
def test_bad_queries_are_4xx_with_one_line(id_run):
    user, item = users_of(id_run)[0], items_of(id_run)[0]
    cases = [
        ("post", "/recommend", {"json": {"user_id": "ghost"}}, 404, ["'ghost'"]),
        ("post", "/recommend", {"json": {"history": [item, "nosuch", "other"]}}, 404, ["'nosuch'", "'other'"]),
        ("get", "/items/nosuch/similar", {}, 404, ["'nosuch'"]),
        ("post", "/recommend", {"json": {"user_id": user, "k": 0}}, 422, ["between 1 and 80"]),
        ("post", "/recommend", {"json": {"user_id": user, "k": -3}}, 422, ["between 1 and 80"]),
        ("post", "/recommend", {"json": {"user_id": user, "k": 81}}, 422, ["between 1 and 80", "81"]),
        ("get", f"/items/{item}/similar", {"params": {"k": 500}}, 422, ["between 1 and 80"]),
        ("get", f"/items/{item}/similar", {"params": {"k": "ten"}}, 422, ["k:"]),
        ("post", "/recommend", {"content": b'{"user_id": ', "headers": {"content-type": "application/json"}}, 422,
         ["malformed JSON"]),
        ("post", "/recommend", {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 422, []),
        ("post", "/recommend", {"json": [1, 2]}, 422, []),
        ("post", "/recommend", {"json": {}}, 422, ["exactly one of user_id or history"]),
        ("post", "/recommend", {"json": {"user_id": user, "history": [item]}}, 422, ["exactly one"]),
        ("post", "/recommend", {"json": {"history": []}}, 422, ["history is empty"]),
        ("post", "/recommend", {"json": {"history": "i00001"}}, 422, ["history"]),
        ("post", "/recommend", {"json": {"user": user}}, 422, ["user"]),
        # strict types: nothing is converted
        ("post", "/recommend", {"json": {"user_id": user, "k": True}}, 422, ["k:"]),
        ("post", "/recommend", {"json": {"user_id": user, "k": "10"}}, 422, ["k:"]),
        ("post", "/recommend", {"json": {"user_id": user, "k": 10.0}}, 422, ["k:"]),
        ("post", "/recommend", {"json": {"history": [item, 7]}}, 422, ["history[1]"]),
        ("post", "/recommend", {"json": {"user_id": 17}}, 422, ["user_id"]),
        ("post", "/recommend", {"json": {"user_id": user, "exclude_history": "yes"}}, 422, ["exclude_history"]),
        ("post", "/recommend/batch", {"json": {"queries": [{"user_id": user, "k": "3"}]}}, 422, ["queries[0].k"]),
        ("post", "/recommend/batch", {"json": {"queries": []}}, 422, ["queries"]),
        ("post", "/recommend/batch", {"json": {"queries": [{"user_id": user}, {"user_id": "ghost"}]}}, 404,
         ["queries[1]", "'ghost'"]),
        ("post", "/recommend/batch", {"json": {"queries": [{"user_id": user, "k": 0}]}}, 422, ["queries[0]"]),
    ]
    for window in (0, 2):
        with served(id_run, batch_window_ms=window) as client:
            for method, url, kwargs, status, needles in cases:
                assert_refused(getattr(client, method)(url, **kwargs), status, *needles)
            assert client.get("/health").status_code == 200


def test_an_id_run_refuses_uploads(id_run):
    with served(id_run) as client:
        assert_refused(client.post("/items", files=cover_files(new_cover_names()[:1])), 409, "id run",
                       "no image tower")


def test_bad_uploads_are_refused_and_add_nothing(image_run, tmp_path):
    version = RunDir(image_run).published().version
    good = cover_files(new_cover_names()[:1])
    with served(image_run, max_upload_mb=0.05) as client:
        cases = [
            ({"files": good + [("covers", ("notes.txt", b"this is not an image"))]}, 422, ["'notes.txt'", "notes"]),
            ({"files": [("covers", ("empty.png", b""))]}, 422, ["'empty.png'", "zero-byte"]),
            ({"files": [("covers", ("cut.jpg", good[0][1][1][:200]))]}, 422, ["'cut.jpg'"]),
            ({"files": [("covers", ("big.png", b"\0" * 60_000))]}, 413, ["MB limit"]),
            ({"files": good, "data": {"ids": ["a", "b"]}}, 422, ["2 ids for 1 covers"]),
            ({"files": good, "data": {"ids": ["a/b"]}}, 422, ["'a/b'", "slash"]),
            ({"files": good, "data": {"ids": [".hidden"]}}, 422, ["dot"]),
            ({"files": good, "data": {"ids": ["[PAD]"]}}, 422, ["reserved"]),
            ({"files": good * 2}, 422, ["more than one cover"]),
            ({"data": {"ids": ["x"]}}, 422, ["covers"]),
            ({"json": {"covers": []}}, 422, ["covers"]),
            ({"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=b"}}, 422,
             ["malformed request body"]),
            ({"content": b"garbage", "headers": {"content-type": "multipart/form-data"}}, 422, ["malformed", "boundary"]),
        ]
        for kwargs, status, needles in cases:
            assert_refused(client.post("/items", **kwargs), status, *needles)
        chunked = iter([b'--b\r\nContent-Disposition: form-data; name="covers"; filename="a.png"\r\n\r\n',
                        b"\0" * 60_000, b"\r\n--b--\r\n"])  # no Content-Length: counted as it arrives
        assert_refused(client.post("/items", content=chunked, headers={"content-type": "multipart/form-data; "
                                                                                    "boundary=b"}), 413, "MB limit")
        assert client.get("/health").json()["index_version"] == version
    assert RunDir(image_run).published().version == version
    assert not (RunDir(image_run).added_covers).exists() or not any(RunDir(image_run).added_covers.iterdir())


# ------------------------------------------------------------------------------------ additions
def test_added_covers_are_searchable_at_once_and_survive_a_restart(image_run):
    n = len(items_of(image_run))
    names = new_cover_names()
    with served(image_run) as client:
        before = client.get("/health").json()
        assert before["image_tower"] is True and before["items"] == n
        r = client.post("/items", files=cover_files(names[:4]))
        assert r.status_code == 201, r.text
        added = {a["item_id"]: a["index_id"] for a in r.json()["added"]}
        assert added == {Path(name).stem: n + 1 + i for i, name in enumerate(names[:4])}
        assert r.json()["items"] == n + 4 and r.json()["index_version"] > before["index_version"]
        new = Path(names[0]).stem
        similar = client.get(f"/items/{new}/similar", params={"k": 5}).json()
        assert len(similar["items"]) == 5 and new not in similar["items"]
        answer = client.post("/recommend", json={"history": [new], "k": n + 3}).json()
        same_as_retrieve(answer, retrieve_one(str(image_run), history=[new], k=n + 3))
        assert set(added) - {new} <= set(answer["items"])
        assert client.get("/stats").json()["added_items"] == 4
        # ids of a second request: given explicitly; a known id is skipped, never re-encoded
        r = client.post("/items", files=cover_files(names[3:5], rename=lambda s: "upload"),
                        data={"ids": [Path(names[3]).stem, "renamed-5"]})
        assert r.status_code == 201 and r.json()["skipped"] == [Path(names[3]).stem]
        assert r.json()["added"] == [{"item_id": "renamed-5", "index_id": n + 5}]
    with served(image_run) as client:  # a restart: a new app on the same run directory
        assert client.get("/health").json()["items"] == n + 5
        again = client.get(f"/items/{new}/similar", params={"k": 5}).json()
        assert (again["items"], again["scores"]) == (similar["items"], similar["scores"])
        assert client.get("/items/renamed-5/similar").status_code == 200
        r = client.post("/items", files=cover_files(names[:2]))
        assert r.status_code == 200 and r.json()["added"] == [] and len(r.json()["skipped"]) == 2
        r = client.post("/items", files=cover_files(names[5:6]))
        assert r.json()["added"][0]["index_id"] == n + 6  # ids continue, never reused


def test_queries_during_an_addition_see_one_whole_snapshot(image_run):
    """Threads query (full rankings, which include new items once added) while covers are added:
    each answer is exactly the answer of the version it names, before or after."""
    n = len(items_of(image_run))
    users, items = users_of(image_run)[:6], items_of(image_run)
    queries = [{"user_id": u, "k": n} for u in users] + [{"history": items[:3], "k": n}]

    def expected() -> list[tuple[list, list]]:
        return [(r.items, r.scores) for r in (retrieve_one(str(image_run), user=q.get("user_id"),
                                                           history=q.get("history"), k=n) for q in queries)]

    by_version = {RunDir(image_run).published().version: expected()}
    seen: list[tuple[int, int, tuple[list, list]]] = []
    failures: list[str] = []
    done = threading.Event()
    with served(image_run, batch_window_ms=2) as client:
        def query_loop(offset: int) -> None:
            i, after = offset, 0  # queries sent once the addition had returned
            while after < len(queries):  # every query at least once after it, however fast the loop
                if done.is_set():
                    after += 1
                r = client.post("/recommend", json=queries[i % len(queries)])
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    a = r.json()
                    seen.append((a["index_version"], i % len(queries), (a["items"], a["scores"])))
                i += 1

        threads = [threading.Thread(target=query_loop, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(seen) < len(queries) and time.monotonic() < deadline:  # answers before the addition
            time.sleep(0.01)
        r = client.post("/items", files=cover_files(new_cover_names()))
        done.set()
        for t in threads:
            t.join(timeout=60)
    assert r.status_code == 201 and not failures, failures
    by_version[r.json()["index_version"]] = expected()
    assert {version for version, _, _ in seen} == set(by_version)  # answers from before and after
    for version, q, answer in seen:
        assert answer == by_version[version][q]
    added = {a["item_id"] for a in r.json()["added"]}
    assert any(added & set(answer[0]) for version, _, answer in seen if version == r.json()["index_version"])


def test_the_server_follows_publications_of_other_processes(image_run):
    with served(image_run, poll_s=0.05) as client:
        version = client.get("/health").json()["index_version"]
        add_images_to_run(str(image_run), str(new_covers()), workers=0)  # as `pixelrec index --add-images`
        deadline = time.monotonic() + 10
        while client.get("/health").json()["index_version"] == version and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["index_version"] > version
        assert client.get(f"/items/{Path(new_cover_names()[0]).stem}/similar").status_code == 200


# ------------------------------------------------------------------------------------ the command
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_a_busy_port_and_clients_that_go_away(id_run, tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(pixelrec_cmd() + ["serve", str(id_run), "--port", str(port), "--batch-window-ms", "20"],
                            stdout=log, stderr=subprocess.STDOUT, env=cli_env())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"{base}/health", timeout=2).status_code == 200
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()
                time.sleep(0.2)
        user = users_of(id_run)[3]
        answer = httpx.post(f"{base}/recommend", json={"user_id": user, "k": 4}).json()
        same_as_retrieve(answer, retrieve_one(str(id_run), user=user, k=4))

        busy = invoke(["serve", id_run, "--port", port])  # the port is taken: one line, exit 2
        assert busy.exit_code == 2
        assert_one_line_error(busy.output, f"127.0.0.1:{port}", "in use")

        # clients that go away: mid-body, mid-upload, and while their query waits in a batch
        for partial in (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 500\r\n\r\n{\"user_id\": ",
                        b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                        b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"covers\"; "
                        b"filename=\"a.png\"\r\n\r\n\x89PNG"):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(partial)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{base}/recommend", json={"user_id": user}, timeout=0.005)
        time.sleep(0.1)
        stats = httpx.get(f"{base}/stats").json()
        assert httpx.post(f"{base}/recommend", json={"user_id": user, "k": 4}).json() == answer
        assert stats["refused"] == 0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    output = Path(log.name).read_text()
    assert "Traceback" not in output and "ERROR" not in output, output
    assert f"on http://127.0.0.1:{port}" in output


def test_serve_refuses_a_bad_run_dir_before_starting(tmp_path, id_run):
    """Without --check: a bad directory or setting stops the command before any server starts."""
    for args, needle in (([tmp_path / "missing"], "missing"), ([tmp_path], "not a pixelrec run"),
                         ([id_run, "--batch-window-ms", "nan"], "--batch-window-ms")):
        res = invoke(["serve", *args, "--port", "0"])
        assert res.exit_code == 2
        assert_one_line_error(res.output, needle)


def test_check_loads_and_binds_then_exits(id_run):
    res = invoke(["serve", id_run, "--port", "0", "--check"])
    assert res.exit_code == 0, res.output
    assert "ready to serve" in res.output and "80 items" in res.output
