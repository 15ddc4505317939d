"""Trainable tensors on their way from the learner to the rollout actors, with no copy but Ray's.

Ray pickles a torch tensor's storage in band: a copy when the learner's export is serialised and
another when each rollout actor reads it. A numpy array travels out of band instead: written once
into the object store, then read by every actor on the node as a view of the store's shared memory.
Ray's work per array is not free either (the 448 tensors of a 7B-size LoRA took 100 ms to write
as 448 arrays, 33 ms as one: ``docs/BENCHMARKS.md``), so the message sends storages, not tensors:
DeepSpeed ZeRO-1/2 keeps a parameter group's tensors as views of one flat buffer, which travels as
one array of bytes, and each tensor as its place in it (dtype, offset, shape, stride).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

# A storage travels whole when the tensors sent from it fill at least this share of its bytes (a
# flat buffer pads each tensor to an alignment); the tensors of a storage mostly holding something
# else are copied into the message instead.
WHOLE_STORAGE_SHARE = 0.9
ALIGN_BYTES = 64  # each tensor's offset in a packed buffer, so that any dtype can view it


@dataclass(frozen=True)
class TensorPlace:
    """Where a tensor lies in one of the message's buffers: ``offset``, ``shape`` and ``stride``
    in elements of ``dtype``, as ``torch.as_strided`` takes them."""

    buffer: int
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor, buffer: int, offset: int) -> TensorPlace:
        """``tensor``'s place at element ``offset`` of buffer number ``buffer``."""
        return cls(buffer, tensor.dtype, offset, tuple(tensor.shape), tensor.stride())


@dataclass
class WeightsMessage:
    """Named tensors as places (``places``) in a few byte buffers (``buffers``, numpy uint8)."""

    buffers: list[np.ndarray]
    places: dict[str, TensorPlace]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], copy: bool = False) -> WeightsMessage:
        """``tensors`` without a copy where they are on the CPU: a storage they fill is sent whole
        (a view follows its tensors: serialise the message, e.g. return it from a Ray call, before
        they change). The rest (tensors elsewhere than on the CPU, a small part of a larger
        storage, or everything with ``copy``) is copied into one packed buffer."""
        buffers: list[np.ndarray] = []
        places: dict[str, TensorPlace] = {}
        by_storage: dict[int, list[str]] = {}
        to_pack: list[str] = []
        for name, tensor in tensors.items():
            if copy or tensor.device.type != "cpu":
                to_pack.append(name)
            else:
                by_storage.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
        for names in by_storage.values():
            storage = tensors[names[0]].untyped_storage()
            sent = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
            if sent < WHOLE_STORAGE_SHARE * storage.nbytes():
                to_pack.extend(names)
                continue
            buffers.append(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())
            for name in names:
                places[name] = TensorPlace.of(tensors[name], len(buffers) - 1, tensors[name].storage_offset())
        if to_pack:
            buffers.append(pack({name: tensors[name] for name in to_pack}, len(buffers), places))
        return cls(buffers, places)

    def read_only(self) -> bool:
        """Whether every buffer is read-only, as those read from Ray's object store are: their
        memory never changes, so a reader may keep views of it (which keep the object alive)
        instead of copying. A message made in this process views live tensors: copy from it."""
        return all(not buffer.flags.writeable for buffer in self.buffers)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors, as views of the buffers (never write into them)."""
        with warnings.catch_warnings():  # torch warns for every read-only array it wraps
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = [torch.from_numpy(buffer) for buffer in self.buffers]
        return {
            name: torch.as_strided(raw[p.buffer].view(p.dtype), p.shape, p.stride, p.offset)
            for name, p in self.places.items()
        }


def pack(tensors: dict[str, torch.Tensor], index: int, places: dict[str, TensorPlace]) -> np.ndarray:
    """Copy ``tensors`` (contiguously, each at an aligned offset) into one new CPU byte buffer,
    the message's buffer number ``index``; record their places in ``places``."""
    offsets, size = {}, 0
    for name, tensor in tensors.items():
        offsets[name] = size
        size += -(-tensor.numel() * tensor.element_size() // ALIGN_BYTES) * ALIGN_BYTES
    flat = torch.empty(size, dtype=torch.uint8)
    for name, tensor in tensors.items():
        itemsize = tensor.element_size()
        start = offsets[name]
        region = flat[start : start + tensor.numel() * itemsize].view(tensor.dtype).view(tensor.shape)
        region.copy_(tensor.detach())
        places[name] = TensorPlace.of(region, index, start // itemsize)
    return flat.numpy()
