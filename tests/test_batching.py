"""Length-sorted chunks and padding: the one batching helper training, evaluation and serving share."""

import numpy as np
import pytest
import torch

from elastic_core.batching import Chunking, pad, run_chunked

pytestmark = pytest.mark.fast  # pure logic: `make test-fast`


def test_chunks_are_longest_first_and_respect_both_limits():
    lengths = [5, 40, 12, 40, 7, 30]
    chunks = Chunking(max_texts=2).split(lengths)
    assert chunks == [[1, 3], [5, 2], [4, 0]]
    padded = dict(packed=False)
    assert Chunking(max_texts=2, **padded).shapes(lengths) == [(2, 40), (2, 30), (2, 7)]
    # 80 padded tokens per chunk: two 40s fit, a third text at width 40 would not
    assert Chunking(max_texts=32, max_tokens=80, **padded).shapes(lengths) == [(2, 40), (2, 30), (2, 7)]
    assert Chunking(max_texts=32, max_tokens=100, **padded).shapes(lengths) == [(2, 40), (3, 30), (1, 5)]
    assert sorted(i for c in Chunking(3, 64).split(lengths) for i in c) == list(range(len(lengths)))


def test_a_packed_chunk_costs_its_mean_length():
    """Packed, per-token work follows the real tokens: a chunk is priced at its texts' mean length."""
    assert Chunking(max_texts=32, max_tokens=100).shapes([5, 40, 12, 40, 7, 30]) == [(2, 40), (3, 17), (1, 5)]


def test_a_text_longer_than_the_token_budget_still_runs_alone():
    assert Chunking(max_texts=8, max_tokens=10, packed=False).shapes([50, 3, 2]) == [(1, 50), (2, 3)]


def test_limits_are_validated():
    with pytest.raises(ValueError):
        Chunking(max_texts=0)


def test_pad_masks_and_token_types():
    b = pad([[1, 2, 3], [4]], pad_id=0, token_types=[[0, 0, 1], [0]])
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert "token_type_ids" not in pad([[1]], 0)


def test_run_chunked_returns_rows_in_input_order():
    seqs = [[1] * n for n in (3, 9, 1, 6, 6)]
    seen = []

    def forward(batch):
        seen.append(tuple(batch["input_ids"].shape))
        return batch["attention_mask"].sum(1, keepdim=True).to(torch.float32)  # each row's own length

    out = run_chunked(seqs, forward, pad_id=0, chunking=Chunking(max_texts=2))
    np.testing.assert_array_equal(out[:, 0], [3, 9, 1, 6, 6])
    assert seen == [(2, 9), (2, 6), (1, 1)]  # longest first: padding stays within each chunk
