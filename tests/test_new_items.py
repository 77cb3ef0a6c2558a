"""Cold items (SPEC §1, §4, §7): image towers score items they never saw in training, and new covers
get item vectors through the trained run's own function (`encode --from-run`, `index --add-images`)
without retraining.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from fixtures_images import (
    DIM,
    cold_dataset,
    cold_run,
    copy_run,
    invoke,
    load_pixels,
    new_covers,
    stored_item_vectors,
)
from pixelrec.encode.cache import open_cache
from pixelrec.errors import PixelrecError
from pixelrec.runs.evaluate import evaluate_run
from pixelrec.index.faiss_index import ItemIndex
from pixelrec.runs.item_index import add_images_to_run
from pixelrec.runs.retrieve import retrieve_one
from pixelrec.runs.new_items import RunItemEncoder, run_item_encoder
from pixelrec.runs.rundir import RunDir

# run_item_encoder(covers) vs the run's stored item vectors: max |diff| / mean norm. Measured: 0 for
# frozen and partial (same float16 cache values, same weights), 2.9e-5 for e2e (fit keeps the decoded
# covers in float16).
REL_TOL = 1e-3



def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.linalg.norm(b, axis=1).mean())


def vocabulary(run_dir) -> np.ndarray:
    return RunDir(run_dir).read_data().item_ids  # [N + 1], 0 = PAD


@torch.no_grad()
def encode_covers(enc, covers, item_ids) -> np.ndarray:
    return torch.cat([enc(px) for px in load_pixels(enc, covers, item_ids).split(64)]).numpy()


# =============================================================================================
# cold start: the image tower ranks never-trained items, the id tower cannot
# =============================================================================================


def test_image_model_recommends_cold_items_far_better_than_the_id_model():
    ds = cold_dataset()
    id_run, _ = cold_run("id")
    frozen_run, _ = cold_run("frozen")
    id_rep, img_rep = evaluate_run(str(id_run), "test"), evaluate_run(str(frozen_run), "test")
    assert id_rep["cold"]["users"] == img_rep["cold"]["users"] >= 60  # users whose test target is cold
    chance = 10 / ds.n_items
    id_cold, img_cold = id_rep["cold"]["recall@10"], img_rep["cold"]["recall@10"]
    # measured on 8 dataset seeds: image 0.28 .. 0.58 (0.49 here), id 0.00 .. 0.025 (chance 0.083)
    assert id_cold <= 1.5 * chance
    assert img_cold >= 2.5 * chance and img_cold >= id_cold + 0.15, (img_cold, id_cold)
    assert img_rep["cold"]["ndcg@10"] > id_rep["cold"]["ndcg@10"] + 0.05
    # the id model is fine on warm items: the gap is about cold items, not a broken id run
    assert id_rep["warm"]["recall@10"] > 2.5 * chance
    assert any("near chance" in n for n in id_rep.get("notes", []))


# =============================================================================================
# run_item_encoder is the run's own item function
# =============================================================================================


@pytest.mark.parametrize("kind", ["frozen", "partial", "e2e"])
def test_run_item_encoder_reproduces_the_runs_item_vectors(kind):
    ds = cold_dataset()
    run, _ = cold_run(kind)
    enc = run_item_encoder(str(run))
    assert isinstance(enc, RunItemEncoder) and enc.dim == DIM and not enc.training
    vocab = vocabulary(run)
    vectors, ids = stored_item_vectors(run)
    assert np.array_equal(ids, np.arange(1, len(vocab)))
    mine = encode_covers(enc, ds.covers, vocab[1:])
    assert mine.shape == vectors.shape == (len(vocab) - 1, DIM)
    assert rel_diff(mine, vectors) < REL_TOL


def test_partial_run_encoder_uses_the_trained_top_blocks_not_the_caches():
    """Control for the test above: the trained top blocks moved away from the cache's weights, so an
    encoder that used the cache's blocks would be caught."""
    ds = cold_dataset()
    run, _ = cold_run("partial")
    enc = run_item_encoder(str(run))
    stale = copy.deepcopy(enc)
    stale.tower.top = open_cache(ds.cache()).top_blocks().eval()
    vocab = vocabulary(run)
    vectors, _ = stored_item_vectors(run)
    assert rel_diff(encode_covers(stale, ds.covers, vocab[1:]), vectors) > 10 * REL_TOL


def test_run_item_encoder_refuses_an_id_run():
    run, _ = cold_run("id")
    with pytest.raises(PixelrecError, match="id run"):
        run_item_encoder(str(run))


@pytest.mark.parametrize("kind", ["frozen", "partial"])
def test_encode_from_run_writes_the_runs_item_vectors(kind, tmp_path):
    ds = cold_dataset()
    run, _ = cold_run(kind)
    out = tmp_path / "vectors.h5"
    res = invoke(["encode", "--from-run", run, "--images", ds.covers, "--out", out, "--workers", "0"])
    assert res.exit_code == 0, res.output
    with open_cache(out) as cache:
        assert cache.dim == DIM and int(cache.attrs["dim"]) == DIM  # the recommender's d, not the encoder's
        assert cache.attrs["pooling"] == f"run:{kind}"
        assert not cache.has_tokens
        vocab = vocabulary(run)
        rows = cache.rows_for(vocab[1:])
        assert (rows >= 0).all()
        got = cache.read_embeddings(rows)
    vectors, _ = stored_item_vectors(run)
    assert rel_diff(got, vectors) < REL_TOL  # float16 storage of the run's vectors


def test_encode_from_run_refuses_encoder_options_and_id_runs(tmp_path):
    ds = cold_dataset()
    run, _ = cold_run("frozen")
    res = invoke(["encode", "--from-run", run, "--images", ds.covers, "--out", tmp_path / "x.h5", "--encoder", "RN50"])
    assert res.exit_code != 0 and "--encoder" in res.output
    id_run, _ = cold_run("id")
    res = invoke(["encode", "--from-run", id_run, "--images", ds.covers, "--out", tmp_path / "y.h5"])
    assert res.exit_code != 0 and "id run" in res.output
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.h5").exists()


# =============================================================================================
# index --add-images
# =============================================================================================


def added_names(run_dir) -> list[str]:
    path = RunDir(run_dir).published().index_dir / "added_items.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


@pytest.mark.parametrize("kind", ["frozen", "partial", "e2e"])
def test_add_images_gives_new_items_new_ids_and_their_vectors(kind, tmp_path):
    src, _ = cold_run(kind)
    run = copy_run(src, tmp_path / "run")
    ds = cold_dataset()
    vocab = vocabulary(run)
    n = len(vocab) - 1
    new = sorted(p.stem for p in new_covers().iterdir())
    # a directory mixing 4 new covers with 2 covers of items the run already knows
    batch1 = tmp_path / "batch1"
    batch1.mkdir()
    for name in new[:4]:
        shutil.copy(new_covers() / f"{name}.jpg", batch1)
    for known in vocab[1:3]:
        shutil.copy(ds.covers / f"{known}.jpg", batch1)
    s1 = add_images_to_run(str(run), str(batch1), workers=0)
    assert (s1.added, s1.skipped, s1.failed) == (4, 2, {})
    assert (s1.first_id, s1.last_id) == (n + 1, n + 4)  # after the largest existing id
    assert added_names(run) == new[:4]

    index = ItemIndex.load(RunDir(run).published().index_dir)
    assert len(index) == n + 4 and set(index.ids.tolist()) == set(range(1, n + 5))
    # the added vectors are the run's item function of the new covers
    enc = run_item_encoder(str(run))
    want = encode_covers(enc, new_covers(), new[:4])
    got = index.reconstruct(np.arange(n + 1, n + 5))
    assert rel_diff(got, want) < 1e-5  # stored float32
    # the training vocabulary's vectors are untouched
    old_vectors, _ = stored_item_vectors(src)
    assert np.array_equal(index.reconstruct(np.arange(1, n + 1)), old_vectors)

    # adding the same covers again adds nothing
    s2 = add_images_to_run(str(run), str(batch1), workers=0)
    assert s2.added == 0 and s2.skipped == 6 and s2.first_id is None
    assert added_names(run) == new[:4] and len(ItemIndex.load(RunDir(run).published().index_dir)) == n + 4

    # a second batch (2 more new items + 1 already added) continues the ids (via the CLI)
    batch2 = tmp_path / "batch2"
    batch2.mkdir()
    for name in new[3:6]:
        shutil.copy(new_covers() / f"{name}.jpg", batch2)
    res = invoke(["index", run, "--add-images", batch2])
    assert res.exit_code == 0, res.output
    assert "added 2 items" in res.output and f"{n + 5}..{n + 6}" in res.output
    assert added_names(run) == new[:6]
    index = ItemIndex.load(RunDir(run).published().index_dir)
    assert set(index.ids.tolist()) == set(range(1, n + 7))


def test_added_items_can_be_retrieved_and_used_as_history(tmp_path):
    src, _ = cold_run("frozen")
    run = copy_run(src, tmp_path / "run")
    n = len(vocabulary(run)) - 1
    add_images_to_run(str(run), str(new_covers()), workers=0)
    new = added_names(run)
    assert len(new) == 6
    out = retrieve_one(str(run), history=[new[0]], k=5)
    assert out.history == [new[0]] and len(out.items) == 5 and new[0] not in out.items
    # every added item is in the searchable index: a full-length retrieval returns all of them
    everything = retrieve_one(str(run), history=[new[0]], k=n + 5)
    assert set(new[1:]) <= set(everything.items)
    # and through the CLI
    res = invoke(["retrieve", run, "--history", new[1], "--k", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert new[1] in res.output


def test_add_images_skips_a_corrupt_cover_and_adds_the_others(tmp_path):
    src, _ = cold_run("frozen")
    run = copy_run(src, tmp_path / "run")
    n = len(vocabulary(run)) - 1
    covers = tmp_path / "covers"
    shutil.copytree(new_covers(), covers)
    (covers / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    summary = add_images_to_run(str(run), str(covers), workers=0)
    assert list(summary.failed) == ["zz_broken"]
    assert summary.added == 6 and (summary.first_id, summary.last_id) == (n + 1, n + 6)
    assert "zz_broken" not in added_names(run) and len(added_names(run)) == 6
    assert len(ItemIndex.load(RunDir(run).published().index_dir)) == n + 6
    with pytest.raises(PixelrecError, match="zz_broken"):
        retrieve_one(str(run), history=["zz_broken"])


def test_add_images_to_an_id_run_is_refused_and_changes_nothing(tmp_path):
    src, _ = cold_run("id")
    run = copy_run(src, tmp_path / "run")
    before = (RunDir(run).published().index_dir / "item_ids.npy").read_bytes()
    with pytest.raises(PixelrecError, match="id run"):
        add_images_to_run(str(run), str(new_covers()), workers=0)
    assert added_names(run) == []
    assert (RunDir(run).published().index_dir / "item_ids.npy").read_bytes() == before
    res = invoke(["index", run, "--add-images", new_covers()])
    assert res.exit_code != 0 and "id run" in res.output


def test_new_items_refuse_a_cache_replaced_since_training(tmp_path):
    """The run's adapter was trained on embeddings of encoder seed 0; if the cache at the run's --cache
    path is now another encoder's (seed 1, same model and shapes), new items must not be encoded with it
    (SPEC §8: a cache from another model than the run expects is an error)."""
    from pixelrec.encode.pipeline import EncodeConfig, encode_images
    from pixelrec.encode.encoder import EncoderConfig
    from pixelrec.runtime import write_json

    ds = cold_dataset()
    src, _ = cold_run("frozen")
    run = copy_run(src, tmp_path / "run")
    cache = tmp_path / "cache.h5"
    shutil.copy(ds.cache(), cache)
    meta = RunDir(run).read_config()
    meta["config"]["items"]["cache"] = str(cache)
    write_json(RunDir(run).config, meta)
    vectors, _ = stored_item_vectors(run)
    vocab = vocabulary(run)
    # with the run's own cache (moved), the new-item function is still the run's
    assert rel_diff(encode_covers(run_item_encoder(str(run)), ds.covers, vocab[1:]), vectors) < REL_TOL
    # now replace the cache with another encoder's
    encode_images(EncodeConfig(images=str(ds.covers), out=str(cache),
                               encoder=EncoderConfig(model="pixelrec-tiny-vit", seed=1), split_block=2,
                               num_workers=0, device="cpu", overwrite=True))
    with pytest.raises(PixelrecError, match="cache|encoder|weights"):
        run_item_encoder(str(run))


# =============================================================================================
# hostile cover names (issue: a newline in a name shifted every later name onto the next vector)
# =============================================================================================


def _vector_of(run_dir, name: str) -> np.ndarray:
    """The stored vector the run serves for item `name` (name -> id through the run's names)."""
    from pixelrec.runs.trained import load_trained

    trained = load_trained(str(run_dir))
    ids = [i for i, n in enumerate(trained.item_names) if n == name]
    assert len(ids) == 1, (name, ids)
    return trained.index.reconstruct(np.array(ids))[0]


def test_a_newline_or_reserved_name_fails_and_every_other_name_keeps_its_own_vector(tmp_path):
    src, _ = cold_run("frozen")
    run = copy_run(src, tmp_path / "run")
    n = len(vocabulary(run)) - 1
    new = sorted(p.stem for p in new_covers().iterdir())  # n00000 .. n00005
    covers = tmp_path / "covers"
    covers.mkdir()
    for name in new[:3]:
        shutil.copy(new_covers() / f"{name}.jpg", covers)
    hostile = {f"{new[0]}\n{new[1]}": "U+000A", "[PAD]": "reserved", "[unused]": "reserved"}
    for name, source in zip(hostile, new[3:]):
        shutil.copy(new_covers() / f"{source}.jpg", covers / f"{name}.jpg")

    res = invoke(["index", run, "--add-images", covers])
    assert res.exit_code == 0, res.output
    assert f"added 3 items to {run} (ids {n + 1}..{n + 3}); 3 images failed" in res.output
    assert "already indexed" not in res.output  # reserved names are not counted as known items
    assert f"failed {repr(f'{new[0]}' + chr(10) + f'{new[1]}')}: " in res.output and "reserved" in res.output
    assert added_names(run) == new[:3]
    lines = (RunDir(run).published().index_dir / "added_items.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3  # one JSON string per line

    want = encode_covers(run_item_encoder(str(run)), new_covers(), new[:3])
    for name, vector in zip(new[:3], want):  # each name answers with its own cover's vector
        assert rel_diff(_vector_of(run, name)[None], vector[None]) < 1e-5, name
    last = invoke(["retrieve", run, "--history", new[2], "--k", "3", "--json"])
    assert last.exit_code == 0, last.output
    assert json.loads(last.output)["history"] == [new[2]]

    summary = add_images_to_run(str(run), str(covers), workers=0)  # again: nothing new, the same failures
    assert (summary.added, summary.skipped) == (0, 3)
    assert set(summary.failed) == set(hostile) and all(hostile[k] in v for k, v in summary.failed.items())


def test_an_added_items_file_of_an_earlier_version_is_read_only_when_every_name_is_valid(tmp_path):
    from pixelrec.runs.trained import load_trained

    src, _ = cold_run("frozen")
    run = copy_run(src, tmp_path / "run")
    add_images_to_run(str(run), str(new_covers()), workers=0)
    index_dir = RunDir(run).published().index_dir
    names = added_names(run)
    (index_dir / "added_items.jsonl").unlink()
    legacy = index_dir / "added_items.txt"
    legacy.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    assert list(load_trained(str(run)).item_names[-6:]) == names  # an ordinary earlier run still reads

    legacy.write_text("".join(f"{n}\n" for n in names[:-1]) + "[PAD]\n", encoding="utf-8")
    with pytest.raises(PixelrecError, match=r"added_items.txt: line 6: name '\[PAD\]' is reserved.*earlier pixelrec"):
        load_trained(str(run))
    # what the earlier version wrote for a name holding a newline: one name more than ids
    legacy.write_text("".join(f"{n}\n" for n in names[:2] + ["x"] + names[2:]), encoding="utf-8")
    with pytest.raises(PixelrecError, match="names split"):
        load_trained(str(run))
    res = invoke(["index", run, "--spec", "Flat"])
    assert res.exit_code == 2 and "names split" in res.output


@pytest.mark.parametrize("line, needle", [('"a\\nb"', "U+000A"), ("42", "not a JSON string"),
                                          ('"n00000"', "appears twice"), ("{", "not a JSON string")])
def test_a_tampered_added_items_file_is_refused_in_one_line(tmp_path, line, needle):
    from pixelrec.runs.trained import read_added_items

    src, _ = cold_run("frozen")
    run = copy_run(src, tmp_path / "run")
    add_images_to_run(str(run), str(new_covers()), workers=0)
    path = RunDir(run).published().index_dir / "added_items.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[3] = line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(PixelrecError) as exc:
        read_added_items(path.parent)
    assert needle in str(exc.value) and "line 4" in str(exc.value) and "\n" not in str(exc.value)


def test_an_added_name_that_is_also_a_vocabulary_item_is_refused(tmp_path):
    from pixelrec.runs.trained import load_trained

    src, _ = cold_run("frozen")
    run = copy_run(src, tmp_path / "run")
    add_images_to_run(str(run), str(new_covers()), workers=0)
    path = RunDir(run).published().index_dir / "added_items.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps(str(vocabulary(run)[5]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(PixelrecError, match="also in the training vocabulary"):
        load_trained(str(run))
