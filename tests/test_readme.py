"""The README's commands stay runnable: its tour block is run command by command, then its Python
example, in a fresh folder, offline.

How the tour is shrunk: the tour is already small (minutes on a 2-core CPU); here every number given
to one of the options in SHRINK is capped at the value there (`--users 2000` runs as `--users 300`,
`--epochs 10` as `--epochs 1`), and so is `epochs = N` in the Python example. Nothing else is
changed, so a renamed option, a missing command or a wrong path fails the test. Every other
`pixelrec` command in the README (the real-weights variant, serving, torchrun) is parsed against
the CLI, so its options exist.

`python tests/test_readme.py DIR` runs the tour unshrunk in DIR and prints each command's wall
time (the README's time per step).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SHRINK = {"--users": 300, "--items": 80, "--cold-items": 8, "--epochs": 1}
PY_EPOCHS = re.compile(r"(epochs\s*=\s*)(\d+)")


def fenced_blocks(text: str, heading: str, language: str) -> list[str]:
    """The ```language blocks of the README section that starts with `heading` (up to the next ## heading)."""
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    section = text[start:end if end >= 0 else len(text)]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def commands(block: str, first_words: tuple[str, ...] | None = None) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments and blank lines dropped
    (only the lines starting with one of `first_words`, when given)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        if first_words is not None and line.split()[:1] not in [[w] for w in first_words]:
            continue
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


def shrink(words: list[str]) -> list[str]:
    out = list(words)
    for i, word in enumerate(out[:-1]):
        if word in SHRINK and out[i + 1].isdigit():
            out[i + 1] = str(min(int(out[i + 1]), SHRINK[word]))
    return out


TOUR = commands(fenced_blocks(README, "## Tour", "bash")[0])
PYTHON = fenced_blocks(README, "## Python API", "python")[0]


def run_tour(workdir: Path, small: bool = True, echo: bool = False) -> dict[int, tuple[int, str, float]]:
    """Run the tour in `workdir`: {command number: (exit code, output, seconds)}; the folder the tour
    creates and enters is created under `workdir`."""
    from click.testing import CliRunner

    from pixelrec.cli import cli
    from pixelrec.runtime import set_quiet

    results: dict[int, tuple[int, str, float]] = {}
    here = os.getcwd()
    os.chdir(workdir)
    try:
        for number, command in enumerate(TOUR):
            words = shlex.split(command)
            start = time.perf_counter()
            if words[:2] == ["mkdir", "-p"] and words[3:5] == ["&&", "cd"] and words[2] == words[5] and len(words) == 6:
                Path(words[2]).mkdir(parents=True, exist_ok=True)
                os.chdir(words[2])
                code, output = 0, ""
            elif words[0] == "pixelrec":
                args = shrink(words[1:]) if small else words[1:]
                result = CliRunner().invoke(cli, ["--quiet"] + args, catch_exceptions=True)
                set_quiet(True)
                code, output = result.exit_code, result.output
                if result.exception is not None and not isinstance(result.exception, SystemExit):
                    output += f"\n{type(result.exception).__name__}: {result.exception}"
            else:
                code, output = 127, f"the tour test runs only `pixelrec ...` and `mkdir -p D && cd D`: {command}"
            results[number] = (code, output, time.perf_counter() - start)
            if echo:
                print(f"{results[number][2]:7.1f} s  exit {code}  {command}", flush=True)
        return results
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("readme")
    return workdir, run_tour(workdir)


def _label(command: str) -> str:
    return "-".join(shlex.split(command)[:2])


@pytest.mark.slow
@pytest.mark.parametrize("number", range(len(TOUR)), ids=[f"{i:02d}-{_label(c)}" for i, c in enumerate(TOUR)])
def test_the_tour_runs_offline(tour, number):
    _, results = tour
    code, output, _ = results[number]
    assert code == 0, f"README tour command failed: {TOUR[number]}\n{output}"


@pytest.mark.slow
def test_the_python_example_runs_in_the_tour_folder(tour):
    workdir, _ = tour
    cd = shlex.split(TOUR[0])[5]
    code = PY_EPOCHS.sub(lambda m: m.group(1) + str(min(int(m.group(2)), SHRINK["--epochs"])), PYTHON)
    here = os.getcwd()
    os.chdir(workdir / cd)
    try:
        namespace: dict = {}
        exec(compile(code, "README.md (Python API)", "exec"), namespace)
    finally:
        os.chdir(here)
    assert len(namespace["recs"].items) == 5 and 0 <= namespace["report"]["overall"]["ndcg@10"] <= 1


def _other_commands() -> list[str]:
    """Every `pixelrec ...` / `torchrun ... -m pixelrec ...` command of the README's other bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    tour = set(TOUR)
    found = []
    for block in blocks:
        for command in commands(block, first_words=("pixelrec", "torchrun")):
            words = shlex.split(command)
            if "-m" in words and words[0] == "torchrun":
                words = ["pixelrec"] + words[words.index("-m") + 2:]
            if words[-1:] == ["&"]:  # run in the background: the command itself is what is checked
                words = words[:-1]
            if words and words[0] == "pixelrec" and command not in tour and "..." not in words:
                found.append(shlex.join(words))
    return found


@pytest.mark.parametrize("command", _other_commands())
def test_every_other_readme_command_parses(command):
    """Options and subcommands exist (parsed by click; nothing runs)."""
    import click

    from pixelrec.cli import cli

    words = shlex.split(command)[1:]
    sub = cli.get_command(click.Context(cli), words[0])
    assert sub is not None, f"README names `pixelrec {words[0]}`, which does not exist"
    try:
        sub.make_context(words[0], words[1:])
    except click.UsageError as error:
        pytest.fail(f"README command does not parse: {command}\n{error.format_message()}")


@pytest.mark.smoke
def test_the_tour_is_found_and_only_runs_what_it_can():
    first = shlex.split(TOUR[0])
    assert first[:2] == ["mkdir", "-p"] and first[3:5] == ["&&", "cd"] and first[2] == first[5]
    assert all(c.startswith("pixelrec ") for c in TOUR[1:])
    assert shrink(["synth", "d", "--users", "2000", "--items", "40"]) == ["synth", "d", "--users", "300", "--items", "40"]
    assert any("--epochs" in c for c in TOUR) and all("--epochs" in c for c in TOUR if c.startswith("pixelrec fit"))


if __name__ == "__main__":  # the README's time per step: the tour unshrunk
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("readme-tour-timing")
    target.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    outcome = run_tour(target, small=False, echo=True)
    print(f"{time.perf_counter() - total:7.1f} s  in all; failed: {[TOUR[n] for n, r in outcome.items() if r[0]]}")
