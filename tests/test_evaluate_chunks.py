"""Evaluation never holds users x items: users are encoded and searched a batch at a time and FAISS
returns each chunk's top-k. Chunked evaluation equals unchunked exactly, and the exact search equals
a brute-force full sort whatever the chunking."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures_runs import trained_run
from pixelrec.index import faiss_index
from pixelrec.index.evaluate import build_item_index
from pixelrec.runs.evaluate import evaluate_run
from pixelrec.runs.trained import load_trained


@pytest.fixture(scope="module")
def run_dir():
    return str(trained_run()[0])


@pytest.mark.parametrize("split", ["test", "valid"])
def test_users_in_batches_of_any_size_give_the_same_report(run_dir, split):
    whole = evaluate_run(run_dir, split=split, batch_size=100_000)
    assert whole["users"] == 200
    for batch_size in (1, 7, 64):
        assert evaluate_run(run_dir, split=split, batch_size=batch_size) == whole


def test_search_chunks_equal_one_search_and_a_full_sort(run_dir, monkeypatch):
    trained = load_trained(run_dir)
    data, table = trained.data, trained.table[: trained.data.num_items + 1]
    histories = [data.history(u, "test") for u in range(data.num_users)]
    queries = trained.model.encode_histories(histories, item_table=table)
    index = build_item_index(table)
    scores, ids = index.search(queries, 20, exclude=histories)
    # brute force: every score of every item (fine for 200 x 80), history removed, stable full sort
    ref_scores, ref_ids = faiss_index.brute_force_search(table[1:].numpy(), np.arange(1, len(table)), queries, 20,
                                                         exclude=histories)
    assert np.array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    for entries in (1, 50, 999):  # at most this many query x candidate entries per FAISS call
        monkeypatch.setattr(faiss_index, "_CHUNK_ENTRIES", entries)
        chunk_scores, chunk_ids = index.search(queries, 20, exclude=histories)
        assert np.array_equal(chunk_ids, ids) and np.array_equal(chunk_scores, scores)
