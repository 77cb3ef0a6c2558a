"""ItemIndex (FAISS) against the torch brute-force reference, plus its error handling."""

import json

import numpy as np
import pytest
import torch

from pixelrec.errors import PixelrecError
from pixelrec.index.faiss_index import ItemIndex, brute_force_search
from pixelrec.index.metrics import summarize, target_ranks

N, DIM, USERS, K = 2000, 32, 300, 20


def random_histories(rng, ids, users, max_len):
    """Histories of varied length (0..max_len), mostly ids in the catalogue."""
    return [rng.choice(ids, size=rng.integers(0, max_len + 1), replace=False) for _ in range(users)]


@pytest.fixture(scope="module")
def gaussian():
    """Continuous vectors, ids non-contiguous and inserted in shuffled order."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N, DIM)).astype(np.float32)
    ids = rng.permutation(np.arange(1, 3 * N, 3))[:N].astype(np.int64)
    queries = rng.standard_normal((USERS, DIM)).astype(np.float32)
    histories = random_histories(rng, ids, USERS, 100)
    histories[0] = ids[:700]  # one long history: over-fetch must stay exact for it
    return vectors, ids, queries, histories


@pytest.fixture(scope="module")
def clustered():
    """Clustered vectors, on which approximate indexes behave realistically."""
    rng = np.random.default_rng(1)
    centers = 2 * rng.standard_normal((40, DIM)).astype(np.float32)
    vectors = (centers[rng.integers(0, 40, 4000)] + rng.standard_normal((4000, DIM))).astype(np.float32)
    queries = (centers[rng.integers(0, 40, USERS)] + rng.standard_normal((USERS, DIM))).astype(np.float32)
    return vectors, np.arange(1, 4001, dtype=np.int64), queries


def overlap(a, b):
    """Mean fraction of each row of b found in the same row of a (recall against b)."""
    return np.mean([len(np.intersect1d(x, y)) / len(y) for x, y in zip(a, b)])


@pytest.mark.smoke
def test_flat_equals_brute_force_exactly(gaussian):
    vectors, ids, queries, histories = gaussian
    scores, found = ItemIndex.build(vectors, ids).search(queries, K, exclude=histories)
    ref_scores, ref_found = brute_force_search(vectors, ids, queries, K, exclude=histories)
    np.testing.assert_array_equal(found, ref_found)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)

    rng = np.random.default_rng(2)  # targets: half from the reference top-k, half anywhere
    targets = np.where(rng.random(USERS) < 0.5, ref_found[np.arange(USERS), rng.integers(0, K, USERS)],
                       rng.choice(ids, USERS))
    ours, ref = target_ranks(found, targets), target_ranks(ref_found, targets)
    np.testing.assert_array_equal(ours, ref)
    assert summarize(ours, (5, 10, 20)) == summarize(ref, (5, 10, 20))
    assert summarize(ours, (20,))["recall@20"] > 0.3


def test_flat_breaks_exact_ties_like_brute_force():
    """Small dyadic values make every dot product exact, so scores tie often and bit-for-bit."""
    rng = np.random.default_rng(3)
    vectors = (rng.integers(-4, 5, (N, DIM)) / 4).astype(np.float32)
    queries = (rng.integers(-4, 5, (USERS, DIM)) / 4).astype(np.float32)
    ids = rng.permutation(N).astype(np.int64) + 1
    histories = random_histories(rng, ids, USERS, 60)
    scores, found = ItemIndex.build(vectors, ids).search(queries, K, exclude=histories)
    ref_scores, ref_found = brute_force_search(vectors, ids, queries, K, exclude=histories)
    assert (np.diff(ref_scores, axis=1) == 0).sum() > 500  # the case really has many ties
    np.testing.assert_array_equal(scores, ref_scores)
    np.testing.assert_array_equal(found, ref_found)
    tied = np.diff(scores, axis=1) == 0
    assert (np.diff(found, axis=1)[tied] > 0).all()  # equal scores: smaller id first


def test_flat_cosine_equals_brute_force(gaussian):
    vectors, ids, queries, histories = gaussian
    vectors = vectors * np.random.default_rng(4).uniform(0.1, 10, (N, 1)).astype(np.float32)
    scores, found = ItemIndex.build(vectors, ids, metric="cosine").search(queries, K, exclude=histories)
    ref_scores, ref_found = brute_force_search(vectors, ids, queries, K, exclude=histories, metric="cosine")
    np.testing.assert_array_equal(found, ref_found)
    assert scores.max() <= 1 + 1e-6
    _, ip_found = brute_force_search(vectors, ids, queries, K, exclude=histories)
    assert (ip_found != found).any()  # cosine really differs from inner product here


def test_excluded_ids_never_returned(gaussian):
    vectors, ids, queries, histories = gaussian
    _, found = ItemIndex.build(vectors, ids).search(queries, 50, exclude=histories)
    for row, history in zip(found, histories):
        assert not np.isin(row, history).any()
    assert len(histories[0]) == 700 and (found[0] >= 0).all()


def test_history_with_unknown_padding_and_repeated_ids(gaussian):
    vectors, ids, queries, _ = gaussian
    history = np.concatenate([ids[:5], ids[:5], [0, 10**9, -3]])
    _, found = ItemIndex.build(vectors, ids).search(queries[:2], K, exclude=[history, []])
    _, ref = brute_force_search(vectors, ids, queries[:2], K, exclude=[history, []])
    np.testing.assert_array_equal(found, ref)
    assert not np.isin(found[0], ids[:5]).any()


def test_rows_padded_when_too_few_items_remain():
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((30, 8)).astype(np.float32)
    ids = np.arange(1, 31, dtype=np.int64)
    queries = rng.standard_normal((2, 8)).astype(np.float32)
    exclude = [ids[:25], ids[:3]]
    for scores, found in (ItemIndex.build(vectors, ids).search(queries, 10, exclude=exclude),
                          brute_force_search(vectors, ids, queries, 10, exclude=exclude)):
        assert (found[0, :5] > 25).all() and (found[0, 5:] == -1).all()
        assert np.isneginf(scores[0, 5:]).all() and np.isfinite(scores[0, :5]).all()
        assert (found[1] > 3).all()


def test_ivf_with_all_lists_is_exact_and_fewer_lists_close(clustered):
    vectors, ids, queries = clustered
    _, exact = ItemIndex.build(vectors, ids).search(queries, K)
    ivf = ItemIndex.build(vectors, ids, spec="IVF32", nprobe=32)
    assert ivf.spec == "IVF32,Flat" and ivf.nprobe == 32 and not ivf.is_exact
    assert overlap(ivf.search(queries, K)[1], exact) == 1.0
    ivf.set_search_params(nprobe=8)
    assert ivf.nprobe == 8
    assert overlap(ivf.search(queries, K)[1], exact) >= 0.9
    ivf.set_search_params(nprobe=1)
    assert overlap(ivf.search(queries, K)[1], exact) < 0.99


def test_hnsw_recall_with_generous_ef_search(clustered):
    vectors, ids, queries = clustered
    _, exact = ItemIndex.build(vectors, ids).search(queries, K)
    hnsw = ItemIndex.build(vectors, ids, spec="HNSW16", ef_search=128)
    assert hnsw.ef_search == 128 and hnsw.nprobe is None
    assert overlap(hnsw.search(queries, K)[1], exact) >= 0.95


def test_add_new_items_then_found(gaussian):
    vectors, ids, queries, _ = gaussian
    index = ItemIndex.build(vectors[:1500], ids[:1500], metric="cosine")
    index.add(vectors[1500:], ids[1500:])
    assert index.ntotal == N
    _, top = index.search(vectors[1500:1510], 1)
    assert top[:, 0].tolist() == ids[1500:1510].tolist()  # cosine: each vector is its own nearest
    _, found = index.search(queries, K)
    _, ref = brute_force_search(vectors, ids, queries, K, metric="cosine")
    np.testing.assert_array_equal(found, ref)
    np.testing.assert_array_equal(index.reconstruct(ids[[1600, 3]]), vectors[[1600, 3]])


def test_add_to_trained_ivf_uses_existing_quantizer(clustered):
    vectors, ids, queries = clustered
    index = ItemIndex.build(vectors[:3000], ids[:3000], spec="IVF16,Flat", nprobe=16)
    index.add(vectors[3000:], ids[3000:])
    _, exact = brute_force_search(vectors, ids, queries, K)
    assert index.ntotal == 4000 and overlap(index.search(queries, K)[1], exact) == 1.0


def test_add_rejects_colliding_duplicate_and_padding_ids(gaussian):
    vectors, ids, _, _ = gaussian
    index = ItemIndex.build(vectors[:100], ids[:100])
    with pytest.raises(PixelrecError, match=f"already in the index: {min(ids[5], ids[7])}"):
        index.add(vectors[100:103], np.array([ids[5], ids[7], 10**8]))
    with pytest.raises(PixelrecError, match="duplicate item id"):
        index.add(vectors[100:102], np.array([10**8, 10**8]))
    with pytest.raises(PixelrecError, match="0 is padding"):
        index.add(vectors[100:101], np.array([0]))
    assert index.ntotal == 100


@pytest.mark.parametrize("spec,params", [("Flat", {}), ("IVF16", {"nprobe": 4}), ("HNSW16", {"ef_search": 40})])
def test_save_load_roundtrip(tmp_path, clustered, spec, params):
    vectors, ids, queries = clustered
    index = ItemIndex.build(vectors, ids, spec=spec, metric="cosine", **params)
    index.save(tmp_path)
    loaded = ItemIndex.load(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    assert meta["spec"] == index.spec and meta["metric"] == "cosine" and meta["ntotal"] == 4000
    assert loaded.describe() == index.describe()
    for a, b in zip(loaded.search(queries, K), index.search(queries, K)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.vectors, vectors)


def test_truncated_or_corrupt_index_file(tmp_path, gaussian):
    vectors, ids, _, _ = gaussian
    ItemIndex.build(vectors, ids).save(tmp_path)
    path = tmp_path / "index.faiss"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PixelrecError, match=r"index\.faiss.*truncated.*pixelrec index"):
        ItemIndex.load(tmp_path)
    # even if index.json is made to agree with the damaged file, FAISS's read error is reported
    import hashlib
    meta = json.loads((tmp_path / "index.json").read_text())
    meta["index_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(PixelrecError, match=r"index\.faiss: cannot read the FAISS index.*pixelrec index"):
        ItemIndex.load(tmp_path)


def test_missing_files(tmp_path, gaussian):
    vectors, ids, _, _ = gaussian
    ItemIndex.build(vectors[:50], ids[:50]).save(tmp_path)
    (tmp_path / "item_ids.npy").unlink()
    with pytest.raises(PixelrecError, match="missing item_ids.npy"):
        ItemIndex.load(tmp_path)
    with pytest.raises(PixelrecError, match="missing index.faiss, index.json"):
        ItemIndex.load(tmp_path / "nowhere")


def test_unknown_spec_names_spec_and_examples(gaussian):
    vectors, ids, _, _ = gaussian
    with pytest.raises(PixelrecError, match=r"'IVFbanana'.*could not parse.*IVF1024,Flat"):
        ItemIndex.build(vectors, ids, spec="IVFbanana")


def test_too_few_vectors_for_ivf(gaussian):
    vectors, ids, _, _ = gaussian
    with pytest.raises(PixelrecError, match=r"'IVF1024,Flat' needs at least 1024 .* only 500; .*'IVF8,Flat'"):
        ItemIndex.build(vectors[:500], ids[:500], spec="IVF1024")


def test_search_parameter_for_wrong_index_type(gaussian):
    vectors, ids, _, _ = gaussian
    with pytest.raises(PixelrecError, match="nprobe applies to IVF indexes only"):
        ItemIndex.build(vectors[:50], ids[:50], spec="Flat", nprobe=4)


def test_k_larger_than_catalogue_and_dim_mismatch(gaussian):
    vectors, ids, queries, _ = gaussian
    index = ItemIndex.build(vectors[:50], ids[:50])
    with pytest.raises(PixelrecError, match="k=51 but the index holds only 50 items"):
        index.search(queries, 51)
    with pytest.raises(PixelrecError, match="k=51 but the index holds only 50 items"):
        brute_force_search(vectors[:50], ids[:50], queries, 51)
    with pytest.raises(PixelrecError, match="dimension 16 .* dimension 32"):
        index.search(queries[:, :16], 5)
    with pytest.raises(PixelrecError, match="dimension 16 but the index holds 32"):
        index.add(vectors[:2, :16], np.array([10**7, 10**7 + 1]))


def test_bad_queries_and_exclusion_lists(gaussian):
    vectors, ids, queries, _ = gaussian
    index = ItemIndex.build(vectors[:50], ids[:50])
    bad = queries[:3].copy()
    bad[1, 0] = np.nan
    with pytest.raises(PixelrecError, match=r"NaN or inf at row\(s\) 1"):
        index.search(bad, 5)
    with pytest.raises(PixelrecError, match="2 exclusion lists for 3 query vectors"):
        index.search(queries[:3], 5, exclude=[[], []])


def test_cuda_device(gaussian):
    vectors, ids, queries, _ = gaussian
    if not torch.cuda.is_available():
        with pytest.raises(PixelrecError, match="CUDA is not available"):
            ItemIndex.build(vectors, ids, device="cuda")
    else:  # an exact index searches with torch on the GPU: no faiss-gpu needed
        gpu = ItemIndex.build(vectors, ids, device="cuda:0")
        assert gpu.device == "cuda:0"
        _, ref = brute_force_search(vectors, ids, queries, K)
        np.testing.assert_array_equal(gpu.search(queries, K)[1], ref)
        if not hasattr(__import__("faiss"), "StandardGpuResources"):
            with pytest.raises(PixelrecError, match=r"pixelrec\[gpu\]"):
                ItemIndex.build(vectors, ids, spec="IVF16", device="cuda:0")
    assert ItemIndex.build(vectors[:50], ids[:50], device="auto").device in ("cpu", "cuda:0")


def test_one_faiss_call_per_group_without_ties(gaussian, monkeypatch):
    """FAISS's own search (approximate indexes; Flat kept to compare with) searches rows again only
    for ties at the cut, which continuous data does not have; it equals the exact search."""
    vectors, ids, queries, histories = gaussian
    index = ItemIndex.build(vectors, ids)
    calls = []
    search = index._faiss_search
    monkeypatch.setattr(index, "_faiss_search", lambda q, fetch: calls.append(fetch) or search(q, fetch))
    found = index.search_with_faiss(queries, K)[1]
    assert calls == [K + 1]
    np.testing.assert_array_equal(found, index.search(queries, K)[1])
    calls.clear()
    index.search_with_faiss(queries[:2], K, exclude=[ids[:20], ids[:3]])
    assert sorted(calls) == [K + 4 + 1, K + 32 + 1]
    index.search(queries[:2], K, exclude=[ids[:20], ids[:3]])
    assert len(calls) == 2  # the exact (Flat) search does not go through FAISS


@pytest.fixture(scope="module")
def uneven():
    """Vectors whose norms vary five-fold, as trained item vectors do (popular items are longer)."""
    rng = np.random.default_rng(5)
    vectors = (rng.standard_normal((N, DIM)) * rng.uniform(0.4, 2.0, (N, 1))).astype(np.float32)
    ids = np.arange(1, N + 1, dtype=np.int64) * 7
    queries = rng.standard_normal((USERS, DIM)).astype(np.float32) + 1.5  # a common direction, like users'
    return vectors, ids, queries, random_histories(rng, ids, USERS, 60)


def test_ip_to_l2_reduction_finds_the_exact_top_inner_products(uneven):
    vectors, ids, queries, histories = uneven
    ref_scores, ref_found = ItemIndex.build(vectors, ids).search(queries, K, exclude=histories)
    for spec, params in (("IP2L2,Flat", {}), ("IP2L2,IVF16", {"nprobe": 16})):
        index = ItemIndex.build(vectors, ids, spec=spec, **params)
        assert index.dim == DIM and index._index.d == DIM + 1 and index.metric == "ip"
        scores, found = index.search(queries, K, exclude=histories)
        np.testing.assert_array_equal(found, ref_found)  # scanning everything: the exact top-k
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)  # exact inner products, not L2
    ivf = ItemIndex.build(vectors, ids, spec="IP2L2,IVF16", nprobe=4)
    scores, found = ivf.search(queries, K, exclude=histories)
    assert 0.2 < overlap(found, ref_found) < 1.0  # approximate, but its scores are still the items' true ones
    rows = {int(i): r for r, i in enumerate(ids)}
    for user in (0, 1, 2):
        want = vectors[[rows[int(i)] for i in found[user]]] @ queries[user]
        np.testing.assert_allclose(scores[user], want, rtol=1e-5, atol=1e-5)
        assert not set(found[user]) & set(histories[user].tolist())


def test_ip_to_l2_index_saves_its_radius_and_refuses_longer_added_items(tmp_path, uneven):
    vectors, ids, queries, _ = uneven
    index = ItemIndex.build(vectors[:-2], ids[:-2], spec="IP2L2,IVF16", nprobe=6)
    index.save(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    assert meta["spec"] == "IP2L2,IVF16,Flat" and meta["dim"] == DIM
    assert meta["ip2l2_radius"] == pytest.approx(np.linalg.norm(vectors[:-2], axis=1).max(), rel=1e-6)
    loaded = ItemIndex.load(tmp_path)
    for a, b in zip(loaded.search(queries, K), index.search(queries, K)):
        np.testing.assert_array_equal(a, b)

    shorter = vectors[-2:] / np.linalg.norm(vectors[-2:], axis=1, keepdims=True)  # norm 1 < the radius
    loaded.add(shorter, ids[-2:])
    assert loaded.ntotal == N
    np.testing.assert_array_equal(loaded.reconstruct(ids[-2:]), shorter)
    loaded.set_search_params(nprobe=16)  # every list: the added items rank where their inner products say
    np.testing.assert_array_equal(loaded.search(queries, K)[1], ItemIndex.build(
        np.concatenate([vectors[:-2], shorter]), ids).search(queries, K)[1])
    longer = np.full((1, DIM), 10.0, dtype=np.float32)
    with pytest.raises(PixelrecError, match=r"item id\(s\) 99999 are longer than .*IP2L2.*pixelrec index"):
        loaded.add(longer, np.array([99999]))
    assert loaded.ntotal == N

    del meta["ip2l2_radius"]
    (tmp_path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(PixelrecError, match=r"index\.json: spec 'IP2L2,IVF16,Flat' without a valid ip2l2_radius"):
        ItemIndex.load(tmp_path)
    with pytest.raises(PixelrecError, match=r"IP2L2, must be followed by a FAISS spec"):
        ItemIndex.build(vectors, ids, spec="IP2L2,")


@pytest.mark.parametrize("spec", ["Flat", "IVF16,Flat"])
def test_a_few_queries_draw_no_progress_bar_when_progress_is_on(clustered, capsys, spec):
    """A library user who never silences progress (serve, retrieve, notebooks) sees no bar flash for a
    single query, on the exact path and on an approximate index alike."""
    from pixelrec.runtime import is_quiet, set_quiet

    vectors, ids, queries = clustered
    index = ItemIndex.build(vectors, ids, spec=spec, nprobe=16) if spec != "Flat" else ItemIndex.build(vectors, ids)
    was = is_quiet()
    set_quiet(False)
    try:
        capsys.readouterr()
        _, found = index.search(queries[:1], K, exclude=[ids[:5]])
        assert found.shape == (1, K) and not np.isin(found, ids[:5]).any()
        assert capsys.readouterr().err == ""
    finally:
        set_quiet(was)
