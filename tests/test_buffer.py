"""ProjectionBuffer: FIFO order, overflow, labels, exact state round trip (docs/design.md section 2.2)."""

import pytest
import torch

from dograph.method.buffer import ProjectionBuffer


def rows(start: int, stop: int, dim: int = 3) -> torch.Tensor:
    """Row i is filled with the value i, so order is readable from column 0."""
    return torch.arange(start, stop, dtype=torch.float32)[:, None].expand(-1, dim).clone()


def ids(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop, dtype=torch.int64) % 7


def test_fills_then_wraps_in_fifo_order():
    buf = ProjectionBuffer(5, 3)
    assert len(buf) == 0 and not buf.is_full
    buf.push(rows(0, 3), ids(0, 3))
    assert len(buf) == 3 and not buf.is_full
    assert buf.data()[:, 0].tolist() == [0, 1, 2]
    buf.push(rows(3, 7), ids(3, 7))  # wraps: rows 0 and 1 are overwritten
    assert len(buf) == 5 and buf.is_full
    assert buf.data()[:, 0].tolist() == [2, 3, 4, 5, 6]
    assert buf.labels().tolist() == ids(2, 7).tolist()
    buf.push(rows(7, 8), ids(7, 8))
    assert buf.data()[:, 0].tolist() == [3, 4, 5, 6, 7]
    assert buf.labels().tolist() == ids(3, 8).tolist()


def test_push_larger_than_capacity_keeps_the_last_rows():
    buf = ProjectionBuffer(5, 3)
    buf.push(rows(0, 2), ids(0, 2))  # write position is not 0 before the big push
    buf.push(rows(2, 14), ids(2, 14))
    assert len(buf) == 5
    assert buf.data()[:, 0].tolist() == [9, 10, 11, 12, 13]
    assert buf.labels().tolist() == ids(9, 14).tolist()
    buf.push(rows(14, 16), ids(14, 16))
    assert buf.data()[:, 0].tolist() == [11, 12, 13, 14, 15]


def test_missing_labels_are_minus_one_and_storage_is_float32():
    buf = ProjectionBuffer(4, 3)
    buf.push(rows(0, 2).double())
    buf.push(rows(2, 3).bfloat16(), torch.tensor([5]))
    assert buf.labels().tolist() == [-1, -1, 5]
    assert buf.data().dtype == torch.float32
    assert buf.data()[:, 0].tolist() == [0, 1, 2]


def test_bad_shapes_raise():
    buf = ProjectionBuffer(4, 3)
    with pytest.raises(ValueError, match=r"\[b, 3\]"):
        buf.push(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="labels"):
        buf.push(torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64))


def test_state_dict_round_trip_continues_identically():
    a = ProjectionBuffer(5, 3)
    a.push(rows(0, 5), ids(0, 5))
    a.push(rows(5, 7), ids(5, 7))  # wrapped: storage [5, 6, 2, 3, 4], write position 2
    state = a.state_dict()
    b = ProjectionBuffer(5, 3)
    b.load_state_dict(state)
    a.push(rows(100, 103), ids(100, 103))
    assert state["data"][:, 0].tolist() == [5, 6, 2, 3, 4]  # a copy, not a view of a's storage
    b.push(rows(100, 103), ids(100, 103))
    assert torch.equal(a.data(), b.data()) and torch.equal(a.labels(), b.labels())
    assert len(a) == len(b) and a.state_dict()["pos"] == b.state_dict()["pos"]
    with pytest.raises(ValueError, match="shape"):
        ProjectionBuffer(6, 3).load_state_dict(state)


def test_clear_and_to():
    buf = ProjectionBuffer(4, 3).to("cpu")
    buf.push(rows(0, 3))
    buf.clear()
    assert len(buf) == 0 and buf.data().shape == (0, 3)
    buf.push(rows(5, 6))
    assert buf.data()[:, 0].tolist() == [5]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_push_on_cuda_does_not_sync():
    buf = ProjectionBuffer(8, 3, device="cuda")
    x, labels = rows(0, 5).cuda(), ids(0, 5).cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        buf.push(x, labels)
        buf.push(x, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert buf.data()[:, 0].tolist() == [2, 3, 4, 0, 1, 2, 3, 4]
