"""Exact (Flat) search gives the same ids and bit-identical scores whatever the batch size and the
candidate path, equal to every item's exact dot product rounded once to float32 and a full sort
(pixelrec/index/exact.py)."""

import numpy as np
import pytest

from pixelrec.index import exact
from pixelrec.index.faiss_index import ItemIndex, brute_force_search

ITEMS, DIM, USERS, K = 10_000, 64, 2_500, 20


def histories(rng, ids, users, longest):
    """Histories of 0..longest ids, a few with unknown ids, one of half the catalogue."""
    lists = [rng.choice(ids, size=rng.integers(0, longest + 1), replace=False) for _ in range(users)]
    lists[3] = ids[: len(ids) // 2]
    lists[5] = np.concatenate([lists[5], [0, -4, 10**9]])
    return lists


@pytest.fixture(scope="module")
def catalogue():
    rng = np.random.default_rng(11)
    vectors = (rng.standard_normal((ITEMS, DIM)) * rng.uniform(0.5, 2, (ITEMS, 1))).astype(np.float32)
    ids = rng.permutation(np.arange(1, 4 * ITEMS, 4))[:ITEMS].astype(np.int64)  # shuffled, gaps
    queries = (rng.standard_normal((USERS, DIM)) + 0.5).astype(np.float32)
    return vectors, ids, queries, histories(rng, ids, USERS, 60)


def in_batches(index, queries, exclude, batch, k=K):
    parts = [index.search(queries[s:s + batch], k, exclude=exclude[s:s + batch])
             for s in range(0, len(queries), batch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def ties(scores):
    """[U, k - 1] bool: finite score j + 1 equals score j."""
    return np.isfinite(scores[:, 1:]) & (scores[:, 1:] == scores[:, :-1])


def test_same_ids_and_bits_for_every_batch_size(catalogue):
    vectors, ids, queries, exclude = catalogue
    index = ItemIndex.build(vectors, ids)
    assert index.is_exact and index._exact is not None
    scores, found = index.search(queries, K, exclude=exclude)  # all at once
    for batch, users in ((1, 300), (7, 700), (64, USERS), (2_000, USERS)):  # batch 1: 300 users (time)
        batch_scores, batch_found = in_batches(index, queries[:users], exclude[:users], batch)
        np.testing.assert_array_equal(batch_found, found[:users])
        assert batch_scores.tobytes() == scores[:users].tobytes(), f"batch {batch}: scores differ in some bit"
    ref_scores, ref_found = brute_force_search(vectors, ids, queries, K, exclude=exclude)
    np.testing.assert_array_equal(found, ref_found)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-6)
    for row, history in zip(found, exclude):
        assert not np.isin(row, history).any()


def test_every_block_layout_gives_the_brute_force_result(catalogue, monkeypatch):
    """Many item blocks (the last one padded), ties, a k larger than a block, and the top k found
    through chunk maxima (k = 10) or directly (k = 50): exact throughout."""
    vectors, ids, queries, exclude = catalogue
    rng = np.random.default_rng(12)
    ids = ids[:3_000]
    dyadic = (rng.integers(-3, 4, (len(ids), DIM)) / 4).astype(np.float32)  # exact sums: many ties
    queries = (rng.integers(-3, 4, (300, DIM)) / 4).astype(np.float32)
    for k in (10, 50):
        ref_scores, ref_found = brute_force_search(dyadic, ids, queries, k, exclude=exclude[:300])
        assert (ref_found[3] == -1).all()  # user 3 excluded every item: a row of padding
        assert ties(ref_scores).sum() > 50 * k
        layouts = ((8192, 1 << 20, 1), (1024, 1 << 14, 3), (1000, 1 << 14, 3), (640, 15_360, 5), (48, 48 * 8, 63))
        for width, group, blocks in layouts:  # (640, 15,360): batches of 7 score 3 blocks, then 2
            monkeypatch.setitem(exact.ITEM_COLUMNS, "cpu", width)
            monkeypatch.setitem(exact.GROUP_ENTRIES, "cpu", group)
            index = ItemIndex.build(dyadic, ids)
            assert len(index._exact.items) == blocks
            scores, found = index.search(queries, k, exclude=exclude[:300])
            np.testing.assert_array_equal(found, ref_found)
            np.testing.assert_array_equal(scores, ref_scores)
            sevens = in_batches(index, queries, exclude[:300], 7, k)
            np.testing.assert_array_equal(sevens[1], ref_found)
            np.testing.assert_array_equal(sevens[0], ref_scores)
            assert (np.diff(found, axis=1)[ties(scores)] > 0).all()  # equal scores: smaller id first


def test_rows_with_too_few_items_and_cosine(catalogue):
    vectors, ids, queries, _ = catalogue
    small = ItemIndex.build(vectors[:30], ids[:30])
    exclude = [ids[:25], ids[:3], []]
    scores, found = small.search(queries[:3], 10, exclude=exclude)
    assert (found[0, :5] >= 0).all() and (found[0, 5:] == -1).all() and np.isneginf(scores[0, 5:]).all()
    ref = brute_force_search(vectors[:30], ids[:30], queries[:3], 10, exclude=exclude)
    np.testing.assert_array_equal(found, ref[1])
    np.testing.assert_allclose(scores, ref[0], rtol=1e-6)  # the reference's BLAS product: last bit
    cosine = ItemIndex.build(vectors, ids, metric="cosine")
    scores, found = cosine.search(queries[:200], K)
    assert scores.max() <= 1 + 1e-6
    np.testing.assert_array_equal(found, brute_force_search(vectors, ids, queries[:200], K, metric="cosine")[1])
    one = in_batches(cosine, queries[:200], [[]] * 200, 1)
    assert one[0].tobytes() == scores.tobytes() and np.array_equal(one[1], found)


def test_added_items_and_reloaded_index_search_the_same(tmp_path, catalogue):
    vectors, ids, queries, exclude = catalogue
    index = ItemIndex.build(vectors[:9_000], ids[:9_000])
    index.add(vectors[9_000:], ids[9_000:])
    whole = ItemIndex.build(vectors, ids).search(queries[:100], K, exclude=exclude[:100])
    added = index.search(queries[:100], K, exclude=exclude[:100])
    np.testing.assert_array_equal(added[1], whole[1])
    index.save(tmp_path)
    loaded = ItemIndex.load(tmp_path).search(queries[:100], K, exclude=exclude[:100])
    assert loaded[0].tobytes() == added[0].tobytes() and np.array_equal(loaded[1], added[1])


def reference(vectors, ids, queries, k, exclude):
    """Every item scored independently of pixelrec: numpy float64 dot products (exact products, sums
    within 1e-14 relative) rounded once to float32, excluded ids dropped, a stable sort by (score, id)."""
    order = np.argsort(ids, kind="stable")
    scores = (queries.astype(np.float64) @ vectors[order].astype(np.float64).T).astype(np.float32)
    out_scores, out_ids = np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1)
    for u, row in enumerate(scores):
        keep = ~np.isin(ids[order], exclude[u])
        rank = np.argsort(-row[keep], kind="stable")[:k]
        out_scores[u, :len(rank)], out_ids[u, :len(rank)] = row[keep][rank], ids[order][keep][rank]
    return out_scores, out_ids


@pytest.mark.parametrize("sparse", [False, True])  # ids looked up in a table, or (far apart) by binary search
def test_scores_are_the_exact_dot_products_rounded_once(catalogue, sparse):
    vectors, ids, queries, exclude = catalogue
    if sparse:
        ids, exclude = ids * 10_000 + 7, [np.asarray(e) * 10_000 + 7 for e in exclude]
    index = ItemIndex.build(vectors, ids)
    assert (index._exact._position is None) == sparse
    for batch in (1, 300):  # FAISS's scan and torch products as the candidates
        scores, found = in_batches(index, queries[:300], exclude[:300], batch)
        ref_scores, ref_found = reference(vectors, ids, queries[:300], K, exclude[:300])
        np.testing.assert_array_equal(found, ref_found)
        np.testing.assert_array_equal(scores, ref_scores)


def test_both_candidate_paths_and_forced_retries_give_the_same_bits(catalogue, monkeypatch):
    """FAISS's scan and torch products as the candidate source, and a margin of 0 with a tie of 40
    copies across the cut (every such row searched again, wider): identical ids and bits."""
    vectors, ids, queries, exclude = catalogue
    vectors = vectors.copy()
    vectors[100:140] = vectors[7] * 3  # 40 copies, longer than any other item: the top of most queries
    index = ItemIndex.build(vectors, ids)
    assert index._exact.faiss_search is not None
    results = []
    for below, margin in ((0, 16), (1 << 30, 16), (0, 0), (1 << 30, 0)):  # products, FAISS; then no margin
        monkeypatch.setattr(exact, "FAISS_BELOW", below)
        monkeypatch.setattr(exact, "MARGIN", margin)
        calls = []
        original = exact.ExactSearch._candidates
        monkeypatch.setattr(exact.ExactSearch, "_candidates",
                            lambda self, q, e, n: calls.append(n) or original(self, q, e, n))
        results.append(index.search(queries[:200], K, exclude=exclude[:200]))
        monkeypatch.setattr(exact.ExactSearch, "_candidates", original)
        if margin == 0 and below == 0:  # (FAISS over-fetches by the excluded ids: a margin of its own)
            assert max(calls) > K, calls  # the tie at the cut was searched again
    for margin in (16, 0):  # one query at a time (FAISS's scan, 1-D steps), the tie forcing retries
        monkeypatch.setattr(exact, "MARGIN", margin)
        monkeypatch.setattr(exact, "FAISS_BELOW", 4)
        calls, scans = [], []
        original, scan = exact.ExactSearch._search_one, index._exact.faiss_search
        monkeypatch.setattr(exact.ExactSearch, "_search_one",
                            lambda self, q, k, e: calls.append(len(q)) or original(self, q, k, e))
        monkeypatch.setattr(index._exact, "faiss_search", lambda q, n: scans.append(n) or scan(q, n))
        results.append(in_batches(index, queries[:200], exclude[:200], 3))
        monkeypatch.setattr(exact.ExactSearch, "_search_one", original)
        monkeypatch.setattr(index._exact, "faiss_search", scan)
        assert len(calls) == 200  # every query went through the one-query path
        if margin == 0:
            assert len(scans) > 200  # the tie at the cut was searched again, wider
    for scores, found in results[1:]:
        np.testing.assert_array_equal(found, results[0][1])
        assert scores.tobytes() == results[0][0].tobytes()
    ref_scores, ref_found = reference(vectors, ids, queries[:200], K, exclude[:200])
    np.testing.assert_array_equal(results[0][1], ref_found)
    np.testing.assert_array_equal(results[0][0], ref_scores)
    copies = np.sort(ids[100:140])
    top = [row for row, history in zip(results[0][1], exclude[:200]) if not np.isin(copies, history).any()]
    assert any(np.array_equal(row, copies[:K]) for row in top)  # the tie, ordered by id
