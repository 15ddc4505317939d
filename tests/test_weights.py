"""The weights message: what travels as one buffer, what is copied, and that every tensor comes
back bit for bit through pickle protocol 5 (what Ray uses, buffers out of band)."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from rlaif_ray.weights import WeightsMessage


def through_pickle(message: WeightsMessage) -> WeightsMessage:
    """The message after a trip out of band, as Ray serialises it (the buffers copied once)."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == len(message.buffers)  # every buffer out of band
    return pickle.loads(data, buffers=[bytes(b.raw()) for b in buffers])


def flat_views(dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Tensors that are views of one flat buffer, as DeepSpeed ZeRO-1/2 keeps a parameter group
    (one of them transposed, so that strides matter)."""
    flat = torch.randn(64 + 12 + 30, generator=torch.Generator().manual_seed(0)).to(dtype)
    views = {
        "a": flat[:64].view(8, 8),
        "b": flat[64:76],
        "c": flat[76:106].view(5, 6).t(),
    }
    return flat, views


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def test_views_of_one_flat_buffer_travel_as_that_buffer_without_a_copy() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        flat, views = flat_views(dtype)
        message = WeightsMessage.of(views)
        assert len(message.buffers) == 1
        assert message.buffers[0].ctypes.data == flat.data_ptr()  # the buffer itself, not a copy
        assert_same(through_pickle(message).tensors(), views)


def test_separate_tensors_travel_each_as_its_own_storage() -> None:
    tensors = {"x": torch.arange(6.0).view(2, 3), "y": torch.ones(4, dtype=torch.bfloat16)}
    message = WeightsMessage.of(tensors)
    assert len(message.buffers) == 2
    assert {b.ctypes.data for b in message.buffers} == {t.data_ptr() for t in tensors.values()}
    assert_same(through_pickle(message).tensors(), tensors)


def test_a_small_part_of_a_larger_storage_is_copied_not_sent_whole() -> None:
    big = torch.randn(1000)
    tensors = {"part": big[10:20], "other": torch.zeros(3)}
    message = WeightsMessage.of(tensors)
    assert sum(b.nbytes for b in message.buffers) < big.numel() * big.element_size()
    assert_same(through_pickle(message).tensors(), tensors)


def test_copy_packs_every_tensor_into_one_buffer_that_later_changes_leave_alone() -> None:
    _, views = flat_views(torch.float32)
    tensors = {**views, "half": torch.full((3,), 2.5, dtype=torch.bfloat16)}
    expected = {k: v.clone() for k, v in tensors.items()}
    message = WeightsMessage.of(tensors, copy=True)
    assert len(message.buffers) == 1
    for tensor in tensors.values():
        tensor.add_(1)
    assert_same(through_pickle(message).tensors(), expected)


def test_read_only_buffers_give_tensors_to_copy_from() -> None:
    _, views = flat_views(torch.bfloat16)
    message = through_pickle(WeightsMessage.of(views))
    for buffer in message.buffers:
        buffer.flags.writeable = False  # as Ray hands out arrays of the object store
    into = {k: torch.zeros_like(v) for k, v in views.items()}
    for name, tensor in message.tensors().items():
        into[name].copy_(tensor)
    assert_same(into, views)
    assert all(isinstance(b, np.ndarray) and b.dtype == np.uint8 for b in message.buffers)
