"""Programmatic dependent launch (Hopper and later): a kernel starts while the one before it finishes.

Each decode step is a chain of a few hundred short kernels; between two of them the GPU drains the first
grid's last blocks and then launches the next, a few microseconds with little memory traffic each time. With
PDL the next kernel's blocks launch as soon as every block of the current one has called
`griddepcontrol.launch_dependents` (`pdl_release`, placed after a kernel's last loads, so that whatever the next
kernel loads before its wait does not compete with them for bandwidth); they start with `griddepcontrol.wait`
(`pdl_wait`) until it has completed and its writes are visible. What is saved is the launch and ramp-up gap
between two kernels.

Short kernels (`pdl_small_kernel_args`: RMSNorm, SiLU·mul, the KV store, split-KV attention) release their
dependents as they start instead, so a product after them (`ember/kernels/gemv.py`) can start fetching its
weights while they run. That never holds back the short kernel itself: the next kernel launches only once every
program of this one has started (released or exited), so its waiting programs take only SM slots that nobody
else is waiting for.

The rule every kernel launched with PDL follows: nothing written by an earlier kernel is read, and nothing at
all is written, before `pdl_wait` (the caching allocator may hand this kernel memory that the one before is
still reading). Two exceptions, used by `EMBER_ATTN_PREFETCH` (and the first by
`EMBER_ATTN_TABLE_BEFORE_WAIT`):
- Buffers written only before the step's forward begins (a step's lengths and block tables, by host-to-device
  copies and, for strided tables, torch's copy kernel: `ModelRunner.device_inputs`, `DecodeGraphs.run`) may be
  read: the forward's first kernel is an ordinary launch, so all of that has completed before any PDL kernel
  of the step starts. A kernel inside the forward that wrote them (an on-device `seq_lens += 1`) would end this.
- An L2 prefetch reads nothing into the kernel, and L2 is where writes land, so it may name memory an earlier
  kernel is still writing. Its address must still be in bounds and 16-byte aligned (a bulk prefetch to an
  unmapped address is not documented as harmless).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# `EMBER_PDL=0` launches every kernel the ordinary way: the baseline when measuring what PDL saves.
PDL_ENABLED = os.environ.get("EMBER_PDL", "1") != "0"
# Short kernels release their dependents as they start (`pdl_small_kernel_args`). `EMBER_PDL_EARLY=0`: after their
# last loads, as the others do; `EMBER_PDL_EARLY=wave`: as they start only if their programs fit one wave (the
# eighth session's rule; 0.01 ms a step slower at batch 1 on an H100, ninth session).
EARLY_RELEASE = os.environ.get("EMBER_PDL_EARLY", "1") != "0"
EARLY_RELEASE_ANY_SIZE = os.environ.get("EMBER_PDL_EARLY") != "wave"
# `EMBER_ATTN_PREFETCH=1` (experimental, off: 3 % slower at batch 1 on an H100, eighteenth session): at batch 1 the qkv
# GEMV releases attention as soon as its own wait is over (`gemv_qkv.RELEASE_AT_WAIT`), and split-KV attention asks L2
# for its segment's K/V before its wait (`paged_attention.PREFETCH_BEFORE_WAIT`), so the context's K/V is on its way
# while the GEMV's last wave runs. Measured, the early release alone costs ~3 µs a layer (likely: attention's
# programs hold SM slots while they wait, which the GEMV's tail still needs) and the prefetch adds ~1.5 µs.
ATTENTION_PREFETCH = os.environ.get("EMBER_ATTN_PREFETCH", "0") == "1"


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def hopper_or_later(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 (Hopper) or later."""
    return device.type == "cuda" and _hopper_or_later(_cuda_index(device))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; on the CPU, where Triton's interpreter runs the kernels, an H100's 132."""
    return _sm_count(_cuda_index(device)) if device.type == "cuda" else 132


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (never under the CPU interpreter)."""
    return PDL_ENABLED and hopper_or_later(device)


def pdl_launch_args(device: torch.device) -> dict[str, bool]:
    """The launch keywords of a kernel that takes `USE_PDL`: the constexpr and the launch attribute agree."""
    pdl = use_pdl(device)
    return {"USE_PDL": pdl, "launch_pdl": pdl}


def pdl_small_kernel_args(device: torch.device, programs: int) -> dict[str, bool]:
    """`pdl_launch_args` of a kernel that also takes `RELEASE_EARLY`: true unless `EMBER_PDL_EARLY=0`, or
    `EMBER_PDL_EARLY=wave` and it has more `programs` than the GPU has SMs."""
    pdl = use_pdl(device)
    early = pdl and EARLY_RELEASE and (EARLY_RELEASE_ANY_SIZE or programs <= sm_count(device))
    return {"USE_PDL": pdl, "launch_pdl": pdl, "RELEASE_EARLY": early}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait until the kernel before this one has completed and its writes are visible."""
    if USE_PDL:
        gdc_wait()


@triton.jit
def pdl_release(USE_PDL: tl.constexpr):
    """Let the next kernel launch once every block of this one has got here."""
    if USE_PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_release_early(USE_PDL: tl.constexpr, RELEASE_EARLY: tl.constexpr):
    """At the start of a short kernel: release the next one now if it runs in one wave."""
    if USE_PDL:
        if RELEASE_EARLY:
            gdc_launch_dependents()


@triton.jit
def pdl_release_late(USE_PDL: tl.constexpr, RELEASE_EARLY: tl.constexpr):
    """After a short kernel's last loads: release the next one unless `pdl_release_early` did."""
    if USE_PDL:
        if not RELEASE_EARLY:
            gdc_launch_dependents()
