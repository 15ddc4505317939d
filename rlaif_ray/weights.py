"""Trainable tensors on their way from the learner to the rollout actors, with no copy but Ray's.

Ray pickles a torch tensor's storage in band: a copy when the learner's export is serialised and
another when each rollout actor reads it. A numpy array travels out of band instead: written once
into the object store, then read by every actor on the node as a view of the store's shared memory.
So the export travels as numpy views of the tensors (bfloat16, which numpy lacks, as int16 arrays
of the same bits), and a rollout actor copies the views straight into its parameters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class WeightsMessage:
    """Named tensors as numpy arrays (``arrays``) and their torch dtypes (``dtypes``)."""

    arrays: dict[str, np.ndarray]
    dtypes: dict[str, torch.dtype]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> WeightsMessage:
        """Views of ``tensors`` (moved to the CPU first where they are elsewhere: one copy). A
        view follows its tensor: serialise the message (return it from a Ray call) before the
        tensors change."""
        arrays, dtypes = {}, {}
        for name, tensor in tensors.items():
            tensor = tensor.detach().cpu()
            dtypes[name] = tensor.dtype
            arrays[name] = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()
        return cls(arrays, dtypes)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors, as views of the arrays. Arrays read from the object store are read-only:
        copy from these tensors, never write into them."""
        with warnings.catch_warnings():  # torch warns for every read-only array it wraps
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return {
                name: torch.from_numpy(array).view(self.dtypes[name]) for name, array in self.arrays.items()
            }
