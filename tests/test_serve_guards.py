"""`pixelrec serve` as a trust boundary: who may add items, and what a request may cost.

Ingestion guards (read-only, beyond loopback, API key, Origin and Host checks), bounded uploads
(pixel cap, covers per request), a full disk during an addition, stale upload directories, and
uvicorn's connection bounds on a real socket. In-process through TestClient, tiny runs from the
fixtures; tests that add covers work on a copy of the run.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from PIL import Image, ImageFile

from fixtures_images import cold_run
from fixtures_runs import copy_run, invoke, trained_run
from pixelrec.data.images import DirImageStore, ImageLoadError
from pixelrec.errors import PixelrecError
from pixelrec.runs import item_index
from pixelrec.runs.item_index import add_images_to_run
from pixelrec.runs.rundir import RunDir
from pixelrec.runs.serving import server as serving_server
from pixelrec.runs.serving import service as serving_service
from pixelrec.runs.serving.app import create_app
from pixelrec.runs.serving.config import ServeConfig
from pixelrec.runs.serving.guards import BodyLimit, HeaderTimeoutH11
from pixelrec.runs.serving.uploads import UPLOAD_PREFIX
from test_serve import assert_refused, cover_files, new_cover_names, served

TOKEN = "s3cret-token-0123456789abcdef"


@pytest.fixture
def image_run(tmp_path) -> Path:
    return copy_run(cold_run("frozen")[0], tmp_path / "run")


@pytest.fixture
def key_file(tmp_path) -> Path:
    path = tmp_path / "api.key"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory) -> bytes:
    """A 1-bit 20000 x 20000 PNG: a few tens of KB on disk, 400 M pixels (1.2 GB as RGB) decoded."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


def unchanged(run: Path, version: int) -> None:
    """Nothing was added: the same published version, no kept cover."""
    assert RunDir(run).published().version == version
    covers = RunDir(run).added_covers
    assert not covers.exists() or not any(covers.iterdir())


# ------------------------------------------------------------------------------------ who may add
def test_cross_origin_uploads_are_refused_same_origin_and_scripts_work(image_run):
    version = RunDir(image_run).published().version
    names = new_cover_names()
    with served(image_run) as client:
        for origin in ("http://evil.example", "http://127.0.0.1:9999", "null", "https://127.0.0.1:8000x"):
            r = client.post("/items", files=cover_files(names[:1]), headers={"Origin": origin})
            assert_refused(r, 403, "another site", origin)
        # a page that rebinds its own name to 127.0.0.1 (same-origin for the browser): refused by Host
        r = client.post("/items", files=cover_files(names[:1]),
                        headers={"Host": "evil.example:8000", "Origin": "http://evil.example:8000"})
        assert_refused(r, 403, "'evil.example:8000'", "loopback")
        assert_refused(client.get("/health", headers={"Host": "evil.example:8000"}), 403, "loopback")
        unchanged(image_run, version)
        # reads are not refused for their Origin (without CORS headers a browser cannot read them)
        assert client.get("/health", headers={"Origin": "http://evil.example"}).status_code == 200
        same_origin = client.post("/items", files=cover_files(names[:1]), headers={"Origin": "http://127.0.0.1:8000"})
        assert same_origin.status_code == 201, same_origin.text
        script = client.post("/items", files=cover_files(names[1:2]))  # no Origin: curl, scripts
        assert script.status_code == 201, script.text
        for host in ("localhost:8000", "app.localhost:8000", "[::1]:8000", "127.0.0.2"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host


def test_read_only_refuses_uploads_and_answers_queries(image_run):
    version = RunDir(image_run).published().version
    with served(image_run, read_only=True) as client:
        assert_refused(client.post("/items", files=cover_files(new_cover_names()[:1])), 403, "read-only", "--read-only")
        assert_refused(client.put("/items"), 403, "read-only")  # any other writing method too
        assert client.get("/health").json()["ingestion"] == "off"
        user = (image_run / "users.txt").read_text().split("\n")[0]
        assert client.post("/recommend", json={"user_id": user, "k": 3}).status_code == 200
    unchanged(image_run, version)


def test_beyond_loopback_without_a_key_is_read_only_with_one_warning(image_run, monkeypatch):
    config = ServeConfig(str(image_run), host="0.0.0.0")
    assert (config.loopback, config.ingestion) == (False, "off")
    warning = config.ingestion_warning()
    assert warning is not None and "\n" not in warning and "--api-key FILE" in warning and "0.0.0.0" in warning
    for host in ("127.0.0.1", "127.9.0.1", "::1", "[::1]", "localhost", "LocalHost"):
        assert ServeConfig(str(image_run), host=host).ingestion == "open"
        assert ServeConfig(str(image_run), host=host).ingestion_warning() is None
    # a name under .localhost is loopback to browsers (accepted as a Host), not to every resolver (not a --host)
    assert ServeConfig(str(image_run), host="app.localhost").ingestion == "off"
    version = RunDir(image_run).published().version
    with served(image_run, host="0.0.0.0", base_url="http://recs.example.org:8000") as client:
        assert_refused(client.post("/items", files=cover_files(new_cover_names()[:1])), 403, "beyond loopback",
                       "--api-key")
        assert client.get("/health").json()["ingestion"] == "off"  # any Host: the machine's names are unknown
    unchanged(image_run, version)
    # the command prints the warning once (bound on loopback here: no test listens on every interface)
    monkeypatch.setattr(serving_server, "bind", lambda host, port: _loopback_socket())
    res = invoke(["serve", image_run, "--host", "0.0.0.0", "--port", "0", "--check"])
    assert res.exit_code == 0, res.output
    assert [line for line in res.output.splitlines() if line.startswith("warning:")] == [warning]


def _loopback_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_api_key_is_required_to_add_items(image_run, key_file):
    version = RunDir(image_run).published().version
    names = new_cover_names()
    with served(image_run, host="0.0.0.0", api_key_file=str(key_file), base_url="http://10.0.0.5:8000") as client:
        assert client.get("/health").json()["ingestion"] == "api-key"
        r = client.post("/items", files=cover_files(names[:1]))
        assert_refused(r, 401, "no API key", "Authorization: Bearer")
        assert r.headers["www-authenticate"] == "Bearer"
        for headers in ({"Authorization": "Bearer wrong-token-0123456789"}, {"X-API-Key": TOKEN[:-1]},
                        {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
            assert client.post("/items", files=cover_files(names[:1]), headers=headers).status_code == 401, headers
        unchanged(image_run, version)
        # the key does not admit other sites' pages
        assert_refused(client.post("/items", files=cover_files(names[:1]),
                                   headers={"Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"}),
                       403, "another site")
        r = client.post("/items", files=cover_files(names[:1]), headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 201, r.text
        r = client.post("/items", files=cover_files(names[1:2]), headers={"X-API-Key": TOKEN})
        assert r.status_code == 201, r.text
        assert client.post("/recommend", json={"history": [Path(names[0]).stem], "k": 2}).status_code == 200
    with served(image_run, api_key_file=str(key_file)) as client:  # on loopback, a key is required too
        assert client.post("/items", files=cover_files(names[2:3])).status_code == 401


def test_api_key_files_that_cannot_hold_a_key_are_refused_in_one_line(tmp_path, key_file):
    run = str(trained_run()[0])
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    empty.chmod(0o600)
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    short.chmod(0o600)
    spaced = tmp_path / "spaced.key"
    spaced.write_text("two words that are long enough\n")
    spaced.chmod(0o600)
    shared = tmp_path / "shared.key"
    shared.write_text(TOKEN)
    shared.chmod(0o644)
    cases = [(tmp_path / "missing.key", "no such file"), (tmp_path, "not a regular file"), (empty, "empty"),
             (short, "at least 16"), (spaced, "without spaces"), (shared, "chmod 600")]
    for path, needle in cases:
        with pytest.raises(PixelrecError) as caught:
            ServeConfig(run, api_key_file=str(path)).check()
        message = str(caught.value)
        assert "\n" not in message and needle in message and f"--api-key {path}" in message, message
    key_file.chmod(0o640)  # group-readable is accepted (a service group), others are not
    assert ServeConfig(run, api_key_file=str(key_file)).check().ingestion == "api-key"


# ------------------------------------------------------------------------------------ bounded uploads
def test_a_decompression_bomb_is_refused_from_its_header(image_run, bomb_png, monkeypatch, tmp_path):
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    version = RunDir(image_run).published().version
    good = cover_files(new_cover_names()[:1])
    with served(image_run) as client:
        started = time.perf_counter()
        r = client.post("/items", files=good + [("covers", ("bomb.png", bomb_png))])
        elapsed = time.perf_counter() - started
    assert_refused(r, 422, "'bomb.png'", "image too large (20000 x 20000)", "40 megapixels")
    assert (20000, 20000) not in decoded and elapsed < 10, (decoded, elapsed)
    unchanged(image_run, version)
    # the same file in a covers folder (`index --add-images`, `encode`): listed as failed, the others added
    folder = tmp_path / "covers"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(bomb_png)
    (folder / "fine.jpg").write_bytes(good[0][1][1])
    with pytest.raises(ImageLoadError, match=r"image too large \(20000 x 20000\)"):
        DirImageStore(folder).load("bomb", max_side=32)
    summary = add_images_to_run(str(image_run), str(folder), workers=0)
    assert summary.added == 1 and list(summary.failed) == ["bomb"], summary
    assert "image too large (20000 x 20000)" in summary.failed["bomb"]
    assert (20000, 20000) not in decoded


def test_pillows_own_bomb_error_is_the_same_one_line(tmp_path, monkeypatch):
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "frame.png")

    def bomb(self):
        raise Image.DecompressionBombError("Image size (999999999 pixels) exceeds limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", bomb)  # as a format whose frames grow while decoding
    with pytest.raises(ImageLoadError, match=r"^item frame: image too large \(40 x 30\); the limit is 40 megapixels"):
        DirImageStore(tmp_path).load("frame")


def test_too_many_covers_in_one_request_is_413(image_run):
    version = RunDir(image_run).published().version
    one = cover_files(new_cover_names()[:1])[0][1][1]
    with served(image_run, max_upload_files=2) as client:
        files = [("covers", (f"c{n}.jpg", one)) for n in range(3)]
        assert_refused(client.post("/items", files=files), 413, "3 covers", "at most 2", "--max-upload-files")
    with served(image_run) as client:  # beyond the multipart parser's own limit (1000 parts): the same 413
        files = [("covers", (f"c{n}.jpg", b"x")) for n in range(1001)]
        assert_refused(client.post("/items", files=files), 413, "at most 64", "--max-upload-files")
    unchanged(image_run, version)


# ------------------------------------------------------------------------------------ a full disk
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/run/added/covers/121.jpg")


def _faiss_full(*args, **kwargs):
    raise RuntimeError("Error in faiss::FileIOWriter: write error in /run/index/v0002/index.faiss: 0 != 1 "
                       "(No space left on device)")


@pytest.mark.parametrize("where, failure", [(serving_service, "write_covers"), (item_index, "_keep_covers"),
                                            (item_index, "write_index")])
def test_a_full_disk_during_an_addition_is_507_and_adds_nothing(image_run, monkeypatch, where, failure):
    version = RunDir(image_run).published().version
    names = new_cover_names()
    with served(image_run) as client:
        with monkeypatch.context() as patch:
            patch.setattr(where, failure, _faiss_full if failure == "write_index" else _enospc)
            r = client.post("/items", files=cover_files(names[:2]))
        assert_refused(r, 507, "no space left on device", "nothing was added")
        assert RunDir(image_run).published().version == version
        assert client.get("/health").json()["index_version"] == version
        r = client.post("/items", files=cover_files(names[:2]))  # space again: the same upload is added whole
        assert r.status_code == 201 and [a["item_id"] for a in r.json()["added"]] == [Path(n).stem for n in names[:2]]


# ------------------------------------------------------------------------------------ leftovers
def test_upload_dirs_of_killed_servers_are_removed_at_start(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"{UPLOAD_PREFIX}{gone.pid}-abc123"
    (stale / ".raw").mkdir(parents=True)
    (stale / ".raw" / "0").write_bytes(b"half an upload")
    ours = tmp_path / f"{UPLOAD_PREFIX}{os.getpid()}-def456"  # a live server's upload in progress
    ours.mkdir()
    other = tmp_path / "pixelrec-serve-upload-notapid"
    other.mkdir()
    with served(trained_run()[0]) as client:
        assert client.get("/health").status_code == 200
    assert not stale.exists() and ours.exists() and other.exists()


# ------------------------------------------------------------------------------------ connection bounds
@contextmanager
def real_server(run_dir, **settings):
    """The app under uvicorn with `pixelrec serve`'s settings, in a thread, on a free 127.0.0.1 port."""
    config = ServeConfig(str(run_dir), poll_s=0, **settings)
    sock = _loopback_socket()
    server = uvicorn.Server(uvicorn.Config(create_app(config), **serving_server.uvicorn_settings(config, True)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _exchange(port: int, data: bytes, wait_s: float = 5.0) -> tuple[bytes, float]:
    """Send `data`, read until the server closes the connection: (what came back, seconds it took)."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(wait_s)
        s.sendall(data)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    return received, time.perf_counter() - started


def test_slow_heads_slow_bodies_large_heads_and_too_many_connections(monkeypatch):
    monkeypatch.setattr(HeaderTimeoutH11, "header_timeout_s", 0.5)
    with real_server(trained_run()[0], body_timeout_s=0.5, max_connections=3) as port:
        # a head that never ends: closed without an answer after the header timeout
        received, took = _exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert received == b"" and 0.4 < took < 4, (received, took)
        # a body that stops coming: 408 after --body-timeout-s, one line, connection closed
        received, took = _exchange(port, b"POST /items HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/"
                                         b"form-data; boundary=b\r\nContent-Length: 1000\r\n\r\n--b\r\n")
        assert received.startswith(b"HTTP/1.1 408") and b"--body-timeout-s" in received and 0.4 < took < 4, received
        # a head still unfinished after 16 KiB: 400 (the buffer of an incomplete head is bounded)
        received, _ = _exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000)
        assert received.startswith(b"HTTP/1.1 400"), received[:80]
        # --max-connections: with three connections open, a fourth request gets 503
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.1)  # accepted (well within the 0.5 s header timeout that would close them)
        try:
            received, _ = _exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert received.startswith(b"HTTP/1.1 503"), received[:80]
        finally:
            for s in idle:
                s.close()
        time.sleep(0.2)
        received, _ = _exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert received.startswith(b"HTTP/1.1 200"), received[:80]


def test_body_limit_times_out_a_stalled_body_and_not_a_finished_one():
    import asyncio

    from starlette.exceptions import HTTPException

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await receive()  # waits for the client to leave: never timed out

    async def main() -> None:
        messages = [{"type": "http.request", "body": b"x" * 10, "more_body": True}]

        async def stalled():
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)

        with pytest.raises(HTTPException) as caught:
            await BodyLimit(app, max_bytes=100, timeout_s=0.2)({"type": "http", "headers": []}, stalled, None)
        assert caught.value.status_code == 408

        whole = [{"type": "http.disconnect"}, {"type": "http.request", "body": b"x", "more_body": False}]

        async def finished():
            await asyncio.sleep(0.3 if len(whole) == 1 else 0)  # the client leaves after the timeout
            return whole.pop()

        await BodyLimit(app, max_bytes=100, timeout_s=0.2)({"type": "http", "headers": []}, finished, None)

    asyncio.run(main())


# ------------------------------------------------------------------------------------ options
def test_serve_options_are_serve_config_fields_with_the_same_defaults():
    from pixelrec.cli import cli
    from test_options import default_of

    fields = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    command = cli.commands["serve"]
    not_settings = ("check_only", "quiet")  # what the command does and prints
    options = {p.name: default_of(command, p) for p in command.params
               if p.param_type_name == "option" and p.name not in not_settings}
    assert options == {name: fields[name] for name in options}
    assert set(fields) - set(options) == {"run_dir", "poll_s"}  # the argument; a setting for tests


def test_worker_processes_unpickle_the_settings_without_loading_torch():
    """--workers > 1: each worker unpickles uvicorn's settings (the protocol class of `guards`) before it
    answers uvicorn's 5-second health check; loading torch there got slow workers killed at startup."""
    code = ("import pickle, sys, uvicorn\n"
            "from pixelrec.runs.serving.config import ServeConfig\n"
            "from pixelrec.runs.serving.server import uvicorn_settings\n"
            "config = uvicorn.Config('pixelrec.runs.serving.app:app_from_environment', factory=True,\n"
            "                        **uvicorn_settings(ServeConfig('run'), True))\n"
            "pickle.loads(pickle.dumps(config))\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", (out.stdout, out.stderr)
