"""Every sequence model of the registry on every item tower, and under torchrun.

For each sequential model (`MODEL_SPECS`, so a model added there is covered without editing this
file) and each item tower (id, frozen, partial, e2e, hybrid) one tiny run is fitted for one epoch on
a small image catalogue (the tiny random-init ViT's cache). On it:
- `evaluate` reproduces the test metrics `fit` reported (the published index scores the test users);
- image towers: `index --add-images` adds a new cover; a raw history ending with it is answered by
  `retrieve` and by `serve` (FastAPI TestClient) exactly as brute force over the stored item vectors
  ranks it, with the user vector computed here from those vectors by the model's own encoder;
- id tower: the whole command line from one run: evaluate, retrieve --user / --history / --users
  (batch JSONL equal to single queries), index --add-images refused in one line, serve --check.
Under torchrun (2 ranks, gloo), one job fits every model (id tower), SR-GNN over the frozen tower and
SASRec over the side tower;
each fit's per-epoch training loss equals the one-process fit's (the project's guarantee: see
tests/test_distributed.py for why losses, not parameters, are compared).

This module is also the torchrun job's script: `python tests/test_zoo_towers.py SPECS.json` fits
every FitConfig (as a dict) of SPECS.json in turn.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelrec.recommend.config import FitConfig, ItemsConfig, SequenceConfig, TrainConfig
from pixelrec.recommend.models.registry import MODEL_SPECS
from pixelrec.runs.fit import fit
from pixelrec.runs.rundir import RunDir

SEQUENTIAL = [name for name, spec in MODEL_SPECS.items() if spec.sequential and not spec.per_user]
TOWERS = ["id", "frozen", "partial", "e2e", "hybrid"]
IMAGE_TOWERS = TOWERS[1:]
DIM, MAX_LEN, K = 16, 6, 10


def zoo_config(data, out: Path, model: str, tower: str, dropout: float | None = None) -> FitConfig:
    """One epoch of `model` over `tower` on `data` (an ImageData), tiny sizes."""
    from fixtures_images import TINY_VIT

    items = ItemsConfig(kind=tower)
    if tower in ("frozen", "partial", "hybrid"):
        items.cache = str(data.cache())
    if tower == "e2e":
        items.images, items.encoder = str(data.covers), TINY_VIT
    if tower == "side":  # the per-layer states of the same tiny ViT
        from fixtures_images import hidden_cache

        items.cache = str(hidden_cache(str(data.root)))
    cfg = FitConfig(interactions=str(data.interactions), out=str(out), items=items,
                    model=SequenceConfig(model=model, dim=DIM, max_len=MAX_LEN, layers=1),
                    train=TrainConfig(epochs=1, batch_size=128, device="cpu", seed=0))
    if dropout is not None:
        cfg.model.dropout = cfg.model.attn_dropout = dropout
    return cfg


# ---------------------------------------------------------------------------------------- fixtures
@functools.lru_cache(maxsize=None)
def zoo_data():
    """100 users, 40 items of 4 styles (4 cold), 32 px covers; its tiny-ViT cache has split-block-2 tokens."""
    from fixtures_images import _synth

    return _synth("zoo", users=100, items=40, cold_items=4, styles=4, cold_user_frac=0.2, seed=3)


@functools.lru_cache(maxsize=None)
def zoo_run(model: str, tower: str):
    """(run dir, FitResult) of one epoch of `model` over `tower`."""
    from fixtures_images import image_root

    out = image_root() / "zoo" / f"{model}-{tower}"
    return out, fit(zoo_config(zoo_data(), out, model, tower))


def user_vector(trained, history: list[int]) -> np.ndarray:
    """The user vector of `history` (item index ids) computed here: the stored item vectors of the
    history, left-padded with zero vectors, through the run's sequence encoder (its last state)."""
    from fixtures_images import stored_item_vectors

    vectors, ids = stored_item_vectors(trained.run.path)
    table = dict(zip(ids.tolist(), vectors))
    hist = history[-MAX_LEN:]
    x = torch.zeros(1, MAX_LEN, vectors.shape[1])
    items = torch.zeros(1, MAX_LEN, dtype=torch.long)
    x[0, MAX_LEN - len(hist):] = torch.from_numpy(np.stack([table[i] for i in hist]))
    items[0, MAX_LEN - len(hist):] = torch.tensor(hist)
    with torch.no_grad():
        return trained.model.states(x, items)[0, -1].numpy()


def brute_force(run_dir: Path, user: np.ndarray, exclude: list[int], k: int) -> tuple[list[int], np.ndarray]:
    """Top-k index ids by inner product over every stored item vector, `exclude` left out."""
    from fixtures_images import stored_item_vectors

    vectors, ids = stored_item_vectors(run_dir)
    scores = vectors @ user
    keep = ~np.isin(ids, exclude)
    order = np.argsort(-scores[keep], kind="stable")[:k]
    return ids[keep][order].tolist(), scores[keep][order]


# ---------------------------------------------------------------------------- every model x tower
@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("model", SEQUENTIAL)
def test_fit_evaluate_and_a_history_scored_against_faiss(model, tower):
    from fixtures_images import new_covers
    from pixelrec.runs.evaluate import evaluate_run
    from pixelrec.runs.item_index import add_images_to_run
    from pixelrec.runs.retrieve import retrieve_one
    from pixelrec.runs.trained import load_trained

    run, result = zoo_run(model, tower)
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["model"]["model"], config["items"]["kind"]) == (model, tower)
    assert np.isfinite(result.test["overall"]["ndcg@10"]) and result.epochs_run == 1
    report = evaluate_run(str(run))
    assert report["overall"]["ndcg@10"] == pytest.approx(result.test["overall"]["ndcg@10"], abs=1e-6)

    names = (run / "items.txt").read_text().split("\n")[1:-1]
    history = [names[3], names[7], names[3], names[11]]  # a repeated item (SR-GNN: one graph node)
    if tower in IMAGE_TOWERS:
        summary = add_images_to_run(str(run), str(new_covers()), workers=0)
        assert summary.added == 6, summary
        new = sorted(p.stem for p in new_covers().iterdir())[0]
        history.append(new)  # a cover added after training, as the most recent item
    got = retrieve_one(str(run), history=history, k=K)
    assert got.history == history

    trained = load_trained(str(run))
    index_of = {name: i for i, name in enumerate(trained.item_names)}
    hist = [index_of[h] for h in history]
    want_ids, want_scores = brute_force(run, user_vector(trained, hist), hist, K)
    assert got.items == [str(trained.item_names[i]) for i in want_ids]
    assert np.allclose(got.scores, want_scores, rtol=1e-4, atol=1e-5)

    from fastapi.testclient import TestClient

    from pixelrec.runs.serving.app import create_app
    from pixelrec.runs.serving.config import ServeConfig

    with TestClient(create_app(ServeConfig(str(run), poll_s=0)), base_url="http://127.0.0.1:8000") as client:
        answer = client.post("/recommend", json={"history": history, "k": K}).json()
    assert (answer["items"], answer["scores"]) == (got.items, got.scores)


# ------------------------------------------------------------------- the id tower's command line
@pytest.mark.parametrize("model", SEQUENTIAL)
def test_the_command_line_on_an_id_run(model, tmp_path):
    from fixtures_images import new_covers
    from fixtures_runs import invoke, one_error_line

    run, result = zoo_run(model, "id")
    r = invoke(["evaluate", run, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["overall"]["ndcg@10"] == pytest.approx(result.test["overall"]["ndcg@10"], abs=1e-6)

    users = (run / "users.txt").read_text().split("\n")[:3]
    singles = []
    for user in users:
        r = invoke(["retrieve", run, "--user", user, "--k", "5", "--json"])
        assert r.exit_code == 0, r.output
        singles.append(json.loads(r.stdout))
    (tmp_path / "users.txt").write_text("\n".join(users) + "\n")
    r = invoke(["retrieve", run, "--users", tmp_path / "users.txt", "--k", "5"])
    assert r.exit_code == 0, r.output
    batch = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert [(b["items"], b["scores"]) for b in batch] == [(s["items"], s["scores"]) for s in singles]

    history = singles[0]["history"][-3:]  # a raw history: the first user's last three items
    r = invoke(["retrieve", run, "--history", ",".join(history), "--k", "5", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert len(got["items"]) == 5 and not set(got["items"]) & set(history)

    before = sorted(p.name for p in run.iterdir())
    one_error_line(invoke(["index", run, "--add-images", new_covers()]), "id")
    assert sorted(p.name for p in run.iterdir()) == before

    r = invoke(["serve", run, "--port", "0", "--check"])
    assert r.exit_code == 0 and "ready to serve" in r.output, r.output


# ------------------------------------------------------------------ benchmarks/coldstart.py --models
def test_coldstart_models_grid_and_its_table():
    """`--models all` is every sequential model; each (model, recipe) fits with --model set and its own
    result file; the table has the models across and the towers down, a cell per model and metric."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "coldstart.py"
    spec = importlib.util.spec_from_file_location("coldstart_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    assert bench.parse_models("all") == SEQUENTIAL
    with pytest.raises(SystemExit, match="--models 'sasrec,mf2'"):
        bench.parse_models("sasrec,mf2")
    grid = bench.model_grid(["sasrec", "srgnn"], {r: bench.RECIPES[r] for r in bench.GRID_RECIPES})
    assert list(grid) == ["sasrec/id", "srgnn/id", "sasrec/frozen", "srgnn/frozen", "sasrec/hybrid", "srgnn/hybrid"]
    assert grid["srgnn/frozen"] == {"items.kind": "frozen", "model.model": "srgnn"}
    rows = []
    for seed, value in ((0, 0.1), (1, 0.3)):
        for name in grid:
            rows.append({"recipe": name, "seed": seed, "s_per_epoch": 2.0, "best_epoch": 1,
                         **{f"{p}_{m}": value + (name == "srgnn/id") for p, m in bench.METRICS}})
    table = bench.grid_table(bench.summarize(rows, list(grid)), ["sasrec", "srgnn"], list(bench.GRID_RECIPES))
    lines = table.splitlines()
    assert lines[0] == "| tower | metric | sasrec | srgnn |"
    assert lines[2] == "| id | NDCG@10 | 0.2000 ± 0.1414 | 1.2000 ± 0.1414 |"
    assert [line.split(" | ")[:2] for line in lines[2:11]] == [
        [f"| {r}", label] for r in bench.GRID_RECIPES for _, _, label in bench.GRID_METRICS]
    assert lines[-2] == "| hybrid | best epoch | 1 ± 0 | 1 ± 0 |" and lines[-1] == "(seeds per cell: 2)"


# ------------------------------------------------------------------------------------ torchrun
def torchrun_cases() -> list[tuple[str, str]]:
    return [(model, "id") for model in SEQUENTIAL] + [("srgnn", "frozen"), ("sasrec", "side")]


@pytest.mark.slow
def test_two_rank_fits_train_the_one_process_models(tmp_path):
    """One torchrun job (2 ranks) fits every case in turn; each equals its one-process fit."""
    from fixtures_runs import cli_env, read_jsonl

    import subprocess

    data = zoo_data()
    cases = torchrun_cases()
    specs = [zoo_config(data, tmp_path / "two" / f"{m}-{t}", m, t, dropout=0.0).to_dict() for m, t in cases]
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, tmp_path / "specs.json"]
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=cli_env(), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(r.stdout.split()) == ["rank0/2", "rank1/2"]  # really two processes in one group
    for (model, tower), spec in zip(cases, specs):
        one = tmp_path / "one" / f"{model}-{tower}"
        result = fit(zoo_config(data, one, model, tower, dropout=0.0))
        got, want = read_jsonl(Path(spec["out"]) / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
        assert got[0]["train_loss"] == pytest.approx(want[0]["train_loss"], rel=1e-5), (model, tower)
        assert got[0]["valid_ndcg@10"] == pytest.approx(want[0]["valid_ndcg@10"], abs=0.02), (model, tower)
        assert RunDir(Path(spec["out"])).read_results()["users"] == result.test["users"]


if __name__ == "__main__":  # the torchrun job of test_two_rank_fits_train_the_one_process_models
    from pixelrec.runtime import set_quiet

    set_quiet(True)
    torch.set_num_threads(1)
    import torch.distributed as dist

    for spec in json.loads(Path(sys.argv[1]).read_text()):
        fit(FitConfig.from_dict(spec))
        if not dist.is_initialized():
            raise SystemExit("fit ran outside a process group")
    print(f"rank{dist.get_rank()}/{dist.get_world_size()}")
