"""The README's screenshot of the browsing page of `pixelrec serve` (docs/browse.png), made by a script.

    python tools/screenshot.py                      # builds a small frozen run under ./pixelrec-screenshot
    python tools/screenshot.py --run RUN_DIR --user u12 --click i00003 --out docs/browse.png

Without --run, a synthetic catalogue is made and a frozen-tower run fitted on it with the CLI
(synth -> encode -> fit, a minute or two on a CPU). The run is served by a real `pixelrec serve` on a
free 127.0.0.1 port and the page is opened in headless Chromium (Debian's `chromium` package) with
its actions in the URL hash (`#user=U&click=ITEM`), then screenshotted.

The helpers here (`find_chromium`, `Server`, `chromium`) are also what tests/test_browse_page.py
drives the page with.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")
_URL = re.compile(r"on (http://\S+?);")


def find_chromium() -> str | None:
    """The headless-capable Chromium on PATH, or None."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


class Server:
    """A `pixelrec serve RUN --port 0` process on 127.0.0.1; `url` once it listens."""

    def __init__(self, run_dir: str | Path, *extra: str, timeout_s: float = 120.0):
        self.log = tempfile.TemporaryFile()
        command = [sys.executable, "-m", "pixelrec.cli", "serve", str(run_dir), "--port", "0", "--quiet", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        self.url = self._wait_for_url(timeout_s)

    def _wait_for_url(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.log.seek(0)
            text = self.log.read().decode("utf-8", "replace")
            found = _URL.search(text)
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                raise RuntimeError(f"pixelrec serve exited with status {self.process.returncode}: {text.strip()}")
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"pixelrec serve did not start within {timeout_s:g} s")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def page_url(base: str, **actions: str) -> str:
    """The page with its hash actions (user, history, k, click, upload-copy, as)."""
    hash_part = "&".join(f"{name.replace('_', '-')}={quote(str(value), safe='')}" for name, value in actions.items())
    return f"{base}/#{hash_part}" if hash_part else f"{base}/"


def chromium(url: str, *, dump_dom: bool = False, screenshot: Path | None = None, size: str = "1280,1000",
             budget_ms: int = 20_000, timeout_s: float = 90.0, binary: str | None = None) -> str:
    """Open `url` in headless Chromium for `budget_ms` of virtual time; the DOM afterwards (dump_dom)
    and/or a PNG screenshot. A fresh profile each time; nothing but `url`'s host is contacted."""
    binary = binary or find_chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="pixelrec-chromium-") as profile:
        command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                   f"--virtual-time-budget={budget_ms}"]
        if dump_dom:
            command.append("--dump-dom")
        if screenshot is not None:
            command.append(f"--screenshot={Path(screenshot).resolve()}")
        done = subprocess.run([*command, url], capture_output=True, text=True, timeout=timeout_s, cwd=profile)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited with status {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


# ----------------------------------------------------------------------------------- the demo run
def build_run(workdir: Path) -> Path:
    """A frozen-tower run on a synthetic catalogue of 64-pixel covers (made once, reused)."""
    run = workdir / "run"
    if (run / "manifest.json").is_file():
        return run
    cli = [sys.executable, "-m", "pixelrec.cli"]

    def step(*args: str) -> None:
        subprocess.run([*cli, *args], check=True)

    step("synth", str(workdir / "data"), "--users", "600", "--items", "160", "--cold-items", "12",
         "--image-size", "64", "--styles", "8", "--seed", "3", "--quiet")
    step("encode", "--images", str(workdir / "data" / "covers"), "--out", str(workdir / "cache.h5"),
         "--encoder", "pixelrec-tiny-vit", "--device", "cpu", "--workers", "0", "--quiet")
    step("fit", "--interactions", str(workdir / "data" / "interactions.csv"), "--out", str(run),
         "--items", "frozen", "--cache", str(workdir / "cache.h5"), "--dim", "32", "--epochs", "8",
         "--device", "cpu", "--quiet")
    return run


def recommend(url: str, user: str, k: int) -> dict:
    import json
    import urllib.request

    request = urllib.request.Request(f"{url}/recommend", method="POST", data=json.dumps({"user_id": user, "k": k}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="A fitted run to serve (default: build a small one under --workdir).")
    parser.add_argument("--workdir", default="pixelrec-screenshot")
    parser.add_argument("--user", help="User to show (default: the first whose top k holds a cold item).")
    parser.add_argument("--click", help="Item whose neighbours to show (default: the first recommendation's).")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "browse.png"))
    args = parser.parse_args()
    run = Path(args.run) if args.run else build_run(Path(args.workdir))
    with Server(run) as server:
        users = [args.user] if args.user else (run / "users.txt").read_text().split("\n")[:100]
        answers = [recommend(server.url, user, args.k) for user in users]
        answer = next((a for a in answers if not all(a["warm"])), answers[0])  # show a cold item's badge
        user, click = answer["user_id"], args.click or answer["items"][0]
        with tempfile.TemporaryDirectory() as tmp:
            shot = Path(tmp) / "page.png"
            chromium(page_url(server.url, user=user, k=str(args.k), click=click), screenshot=shot, size="1200,1350")
            from PIL import Image

            # 256 colours: a third of the bytes, and the covers still look like themselves
            Image.open(shot).convert("RGB").quantize(colors=256).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
