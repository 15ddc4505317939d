"""DeepSpeed ZeRO set-up shared by the SFT warm start and the RL learner.

On the CPU, DeepSpeed runs with ``DS_ACCELERATOR=cpu`` and the gloo backend; on GPUs with nccl.
Only the parameters that require grad (LoRA adapter + projector) reach the optimizer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from rlaif_ray.logs import quiet_prints

log = logging.getLogger(__name__)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for the torch.distributed rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    backend: str,
    rank: int = 0,
    world_size: int = 1,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    timeout_s: float = 1800.0,
) -> None:
    """Join (or create) the torch.distributed group DeepSpeed trains in; a no-op when already joined.

    A collective that does not complete within ``timeout_s`` raises instead of waiting for ever."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    # The backend decides where DeepSpeed runs (a DS_ACCELERATOR=cpu left in the environment by a
    # CPU setup would otherwise put an nccl learner on the CPU).
    os.environ["DS_ACCELERATOR"] = "cpu" if backend == "gloo" else "cuda"
    os.environ.update(
        {
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port or free_port()),
            "RANK": str(rank),
            "LOCAL_RANK": "0",
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": "1",
        }
    )
    with quiet_prints():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            verbose=False,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )


def set_collective_timeout(timeout_s: float) -> None:
    """Give every process group of this process ``timeout_s`` per collective.

    ``init_distributed`` sets it on the default group only: DeepSpeed makes its data-parallel groups
    with ``new_group(ranks)``, which gives them torch's default (30 minutes for gloo). Call it once
    the engine is built. (torch offers no public way to set a group's timeout after its creation.)
    """
    from torch.distributed import distributed_c10d

    for group in list(distributed_c10d._world.pg_map):
        distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a torch.distributed collective that failed (timed out, or its peer is gone):
    nccl raises a ``DistError``, gloo a plain ``RuntimeError`` naming itself."""
    return isinstance(exc, torch.distributed.DistError) or "gloo" in str(exc)


class FiniteAdamW(torch.optim.AdamW):
    """AdamW that skips any step whose gradients hold a NaN or an inf on any rank, or for which a
    rank set ``skip_next`` (a non-finite loss: its gradients can still be finite, e.g. through a
    clamp).

    DeepSpeed calls ``step`` on the ranks' gradient partitions at the same moment, so the check is
    one all-reduce (MAX) of a 0/1 flag: every rank skips, or none does. A skipped step leaves the
    parameters and the moments untouched, so a bad number never reaches the weights that are
    broadcast or saved. (DeepSpeed's ZeRO-1/2 optimizer skips a step with a non-finite gradient
    norm on its own before calling this, except in bf16.) ``applied`` counts the steps taken: a
    caller compares it before and after ``engine.step()`` to learn whether the update happened.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.applied = 0
        self.skip_next = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        bad = self.skip_next or any(not bool(torch.isfinite(g).all()) for g in grads)
        self.skip_next = False
        device = grads[0].device if grads else torch.device("cpu")
        flag = torch.tensor([1.0 if bad else 0.0], device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            return None
        self.applied += 1
        return super().step(closure)


def deepspeed_config(
    zero_stage: int,
    micro_batch_size: int,
    world_size: int,
    grad_clip: float,
    dtype: str = "float32",
    zero3_persistence_threshold: int = 100_000,
) -> dict[str, Any]:
    """The DeepSpeed JSON config (keys as documented by DeepSpeed)."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = zero3_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        # A plain torch optimizer: DeepSpeed's CPU Adam would need a compiled extension.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    zero_stage: int,
    grad_clip: float,
    micro_batch_size: int,
    warmup_steps: int = 0,
    dtype: str = "float32",
    zero3_persistence_threshold: int = 100_000,
) -> Any:
    """Wrap ``model`` in a DeepSpeed engine with AdamW over its trainable parameters (a
    :class:`FiniteAdamW`, reachable as ``engine.basic_optimizer``)."""
    import deepspeed

    world_size = torch.distributed.get_world_size()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = FiniteAdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    )
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(
            zero_stage, micro_batch_size, world_size, grad_clip, dtype, zero3_persistence_threshold
        ),
    )
    if zero_stage == 3:
        register_attention_out_proj(model)
    log.info(
        "DeepSpeed ZeRO-%d engine: %d trainable tensors, world size %d", zero_stage, len(params), world_size
    )
    return engine


def register_attention_out_proj(model: nn.Module) -> None:
    """Let ZeRO-3 gather ``out_proj`` with each ``nn.MultiheadAttention`` (open_clip's encoder uses it).

    The attention module reads ``out_proj.weight`` itself instead of calling ``out_proj``, so the
    partitioned weight would never be fetched by ``out_proj``'s own forward hook.
    """
    from deepspeed.runtime.zero import register_external_parameter

    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            for param in module.out_proj.parameters(recurse=False):
                register_external_parameter(module, param)


@contextlib.contextmanager
def gathered_trainable(model: nn.Module) -> Iterator[None]:
    """Inside, the trainable parameters are whole on every rank, also under ZeRO-3 (where they are
    partitioned and the gather is a collective: every rank must enter at once). Only the trainable
    tensors are gathered, never the frozen model."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def set_micro_batches(engine: Any, count: int) -> None:
    """Make the next optimizer step accumulate exactly ``count`` micro-batches on every rank."""
    engine.set_train_batch_size(count * engine.train_micro_batch_size_per_gpu() * engine.dp_world_size)
