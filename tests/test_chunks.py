"""The chunk plumbing every elementwise loop uses: chunks in order, scratch buffers, rows."""

import pytest
import torch

from merge_dag.core import chunks
from merge_dag.core.chunks import chunked_sum, each_chunk


@pytest.mark.parametrize("threads", [1, 3])
def test_each_chunk_visits_every_chunk_once_in_order(monkeypatch, threads):
    monkeypatch.setattr(chunks, "CPU_CHUNK", 3)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)  # several segment workers when torch has several threads
    try:
        seen = each_chunk(torch.zeros(10), lambda s, e, buf: (s, e, tuple(buf.shape)), scratch=1)
    finally:
        torch.set_num_threads(old)
    assert seen == [(0, 3, (3,)), (3, 6, (3,)), (6, 9, (3,)), (9, 10, (1,))]


def test_each_chunk_on_rows_takes_whole_rows(monkeypatch):
    monkeypatch.setattr(chunks, "CPU_CHUNK", 8)  # 8 entries: two rows of 4
    x = torch.arange(20.0).view(5, 4)
    seen = each_chunk(x, lambda s, e, buf: (s, e, tuple(buf.shape)), scratch=1)
    assert seen == [(0, 2, (2, 4)), (2, 4, (2, 4)), (4, 5, (1, 4))]
    assert each_chunk(torch.zeros(0), lambda s, e: (s, e)) == []


def test_each_chunk_refuses_other_ranks():
    with pytest.raises(ValueError, match=r"each_chunk: expected a 1-D or 2-D tensor, got shape \[2, 2, 2\]"):
        each_chunk(torch.zeros(2, 2, 2), lambda s, e: None)


def test_chunked_sum_adds_the_chunk_sums_in_order(monkeypatch):
    monkeypatch.setattr(chunks, "CPU_CHUNK", 4)
    x = torch.tensor([1e8, 1.0, -1e8, 1.0, 0.5, 0.25, 3.0, -2.0, 7.0])
    want = 0.0
    for s in range(0, 9, 4):
        want += float(x[s : s + 4].sum())
    assert chunked_sum(x, lambda s, e, out: torch.mul(x[s:e], 1.0, out=out)) == want
