"""One-shot all-reduce over symmetric memory, for the small all-reduces of decode steps on NVLink-connected GPUs.

A decode step at batch 1 runs two all-reduces a layer of a few kilobytes each; NCCL takes ~13 us for one inside
a CUDA graph on two H200s, torch's symmetric-memory one-shot kernel ~6.5 us (every rank maps the others' buffer,
copies its input in, waits for the others' and sums all of them itself). Larger messages (prefill) stay on NCCL.

torch finds the group of a symmetric-memory op by name, so the model's NCCL group, which ember keeps as an object
rather than torch's default group, is registered under a name of its own for the life of the engine.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Messages up to this size take the one-shot kernel (64 tokens of a 4096-wide bf16 model). On two H200s: 8 KiB
# 6.5 us vs NCCL 13.1, 64 KiB 7.0 vs 13.8, 512 KiB 11.0 vs 16.4 (bench: docs/PERFORMANCE.md, seventh session).
MAX_BYTES = 512 * 1024
# `EMBER_SYMM_ALL_REDUCE=0` keeps every all-reduce on NCCL: the baseline when measuring what this saves.
ENABLED = os.environ.get("EMBER_SYMM_ALL_REDUCE", "1") != "0"
_DTYPES = (torch.bfloat16, torch.float32)  # those the one-shot kernel is built for
# torch numbers the store exchanges of symmetric-memory rendezvous per process: a driver that has already been
# through one (an earlier engine in the same process) would wait for keys its fresh workers never write. So only
# the first tensor-parallel engine of a process uses symmetric memory; later ones stay on NCCL.
_rendezvous_done = False


def usable(device: torch.device, size: int) -> bool:
    """Whether this rank can take part: the op exists in this torch, every GPU of the group (ranks 0..size-1 on
    devices 0..size-1) can map the others' memory, and this process has not been through a rendezvous yet. The
    ranks' answers can differ (a driver's second engine), so the caller takes the group's minimum."""
    if not ENABLED or device.type != "cuda" or size < 2 or _rendezvous_done:
        return False
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out"):
        return False
    return all(torch.cuda.can_device_access_peer(a, b) for a in range(size) for b in range(size) if a != b)


class SymmetricAllReduce:
    """A registered group name and this rank's symmetric buffer of `MAX_BYTES`."""

    def __init__(self, name: str, buffer: torch.Tensor, group: Any) -> None:
        self.name = name
        self.buffer = buffer  # uint8; viewed as the message's dtype
        self.group = group  # torch's registry holds it weakly: without this reference the name stops resolving

    @classmethod
    def prepare(cls, nccl: Any, gloo: Any, store: Any, rank: int, size: int, device: torch.device,
                name: str) -> SymmetricAllReduce:
        """Register the model group (`nccl`, with `gloo` for host tensors) as `name`, its symmetric-memory
        exchanges going through `store`, and allocate this rank's buffer: local steps, which may fail on one rank
        alone; `rendezvous` is the collective one, once every rank is known to have got this far."""
        import torch.distributed._symmetric_memory as symm_mem
        from torch._C._distributed_c10d import _register_process_group

        global _rendezvous_done
        _rendezvous_done = True

        group = dist.ProcessGroup(store, rank, size)
        group._set_default_backend(dist.ProcessGroup.BackendType.NCCL)
        group._register_backend(torch.device(device.type), dist.ProcessGroup.BackendType.NCCL, nccl)
        group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, gloo)
        group._set_group_name(name)
        _register_process_group(name, group)
        try:
            return cls(name, symm_mem.empty(MAX_BYTES, dtype=torch.uint8, device=device), group)
        except BaseException:
            cls._unregister(name)
            raise

    def rendezvous(self) -> None:
        """Map every rank's buffer into every other (all ranks call it together; it waits for the others as long
        as the store given to `prepare` waits)."""
        import torch.distributed._symmetric_memory as symm_mem

        symm_mem.rendezvous(self.buffer, self.name)

    def fits(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        # The kernel reads the input with the 16-byte alignment of the buffer's slot.
        return (x.dtype in _DTYPES and x.is_contiguous() and x.device == self.buffer.device
                and 0 < nbytes <= MAX_BYTES and nbytes % 16 == 0
                and x.storage_offset() * x.element_size() % 16 == 0)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks, in a new tensor (`x` is left as it was)."""
        nbytes = x.numel() * x.element_size()
        slot = self.buffer[:nbytes].view(x.dtype)
        out = torch.empty_like(x)
        if hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):  # the copy in, inside the kernel
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(slot, x.view(-1), "sum", self.name, out.view(-1))
        else:
            slot.copy_(x.view(-1))
            torch.ops.symm_mem.one_shot_all_reduce_out(slot, "sum", self.name, out.view(-1))
        return out

    def close(self) -> None:
        self._unregister(self.name)

    @staticmethod
    def _unregister(name: str) -> None:
        from torch._C._distributed_c10d import _unregister_process_group

        try:
            _unregister_process_group(name)
        except Exception:  # already gone
            logger.debug("unregistering %s failed", name, exc_info=True)
