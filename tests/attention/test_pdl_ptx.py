"""Where the batch-1 chain's kernels wait and release under PDL, read from the sm_90 PTX that Triton compiles
(and ptxas assembles) on this machine without a GPU: the GPU-only code paths at least lower, and their order is
the one `ember.kernels.pdl` relies on (`EMBER_ATTN_PREFETCH`); the unified attention kernel in both tile orders
(`EMBER_ATTN_SCATTER`). The results on a GPU: tests/gpu."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ember.kernels import gemv_qkv  # noqa: E402
from ember.kernels import paged_attention as attention  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


def _ptx_lines(fn, types: dict[str, str], constexprs: dict[str, object], **options: int) -> list[str]:
    """Compile `fn` for sm_90: `types` by argument name (anything not named there and not a constexpr is i32)."""
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    try:
        kernel = triton.compile(src, target=SM90, options=options)
    except FileNotFoundError as e:  # no ptxas beside this Triton
        pytest.skip(f"cannot assemble for sm_90 here: {e}")
    return kernel.asm["ptx"].splitlines()


def _first(lines: list[str], needle: str) -> int:
    return next(i for i, line in enumerate(lines) if needle in line)


ATTENTION_TYPES = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "out_ptr": "*bf16",
                   "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "counters_ptr": "*i32",
                   "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32",
                   "scale_log2e": "fp32"}


@pytest.mark.parametrize("prefetch_keys", [0, 256])
def test_split_kv_prefetches_before_its_wait(prefetch_keys: int) -> None:
    lines = _ptx_lines(attention._split_kv_decode_kernel, ATTENTION_TYPES, dict(
        GROUP=4, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_M=16, SPLITS_P=16, TILE_N=128, DOT_PRECISION="tf32",
        USE_PDL=True, RELEASE_EARLY=True, ROW_BYTES=256, PREFETCH_KEYS=prefetch_keys, MIN_TILES=2,
        TABLE_BEFORE_WAIT=False), num_warps=4, num_stages=2)
    wait = _first(lines, "griddepcontrol.wait")
    # Released as it starts (a short kernel), so the o_proj GEMV after it can start reading its weights.
    assert _first(lines, "griddepcontrol.launch_dependents") < wait
    # Before the wait: nothing written at all, and no loads but the lengths and the block table (no K/V into the
    # program: what it prefetches goes to L2 only).
    before = lines[:wait]
    assert not any(op in line for line in before for op in ("st.global", "atom.", "red."))
    # The int32 lengths and block-table entries load as scalar b32; bf16 K/V would be b16 or vectors.
    assert all("ld.global.b32 {" in line for line in before if "ld.global" in line)
    prefetches = [i for i, line in enumerate(lines) if "cp.async.bulk.prefetch.L2" in line]
    if prefetch_keys:
        # 256 keys over 128 threads, K and V: two rows each, and all of them before the wait.
        assert len(prefetches) == 4 and max(prefetches) < wait
    else:
        assert not prefetches


QKV_TYPES = {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "q_ptr": "*bf16", "k_cache_ptr": "*bf16",
             "v_cache_ptr": "*bf16", "slot_mapping_ptr": "*i64", "pos_ptr": "*i64", "cos_ptr": "*fp32",
             "sin_ptr": "*fp32", "rms_eps": "fp32"}


@pytest.mark.parametrize("release_at_wait", [False, True])
def test_qkv_gemv_releases_after_its_wait(release_at_wait: bool) -> None:
    lines = _ptx_lines(gemv_qkv._gemv_rotary_store_kv_kernel, QKV_TYPES, dict(
        HALF=64, BLOCK_SIZE=16, HAS_BIAS=False, RMS_NORM=False, BLOCK_K=2048, EVEN_K=True, USE_PDL=True,
        RELEASE_AT_WAIT=release_at_wait), num_warps=8, num_stages=4)
    wait, release = _first(lines, "griddepcontrol.wait"), _first(lines, "griddepcontrol.launch_dependents")
    # Either way after the wait, so everything before this kernel has completed when attention launches. (What
    # attention reads before its own wait, lengths and block tables, is safe without that: host copies.)
    assert wait < release
    loads_between = sum("ld.global" in line for line in lines[wait:release])
    # At its wait: nothing of the K loop in between. After the loop: its weight tiles' loads are.
    assert (loads_between == 0) if release_at_wait else (loads_between > 0)
    assert sum("griddepcontrol.launch_dependents" in line for line in lines) == 1


@pytest.mark.parametrize("scatter", [False, True])
def test_unified_kernel_waits_first_in_either_tile_order(scatter: bool) -> None:
    """`EMBER_ATTN_SCATTER` only renumbers the programs: the kernel still lowers for sm_90 and touches no memory
    before its PDL wait."""
    lines = _ptx_lines(attention._unified_attention_kernel, ATTENTION_TYPES, dict(
        GROUP=4, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_M=64, BLOCK_Q=16, TILE_N=64, DOT_PRECISION="tf32",
        USE_PDL=True, SCATTER=scatter), num_warps=4, num_stages=3)
    wait = _first(lines, "griddepcontrol.wait")
    assert not any("ld.global" in line or "st.global" in line for line in lines[:wait])
    assert any(op in line for line in lines[wait:] for op in ("rem.s64", "rem.u64")) == scatter
