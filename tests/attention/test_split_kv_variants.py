"""The experimental split-KV variants, `EMBER_ATTN_SPLIT_KV` (launch shape) and `EMBER_ATTN_TABLE_BEFORE_WAIT`:
the shape's parsing, and the sm_90 code Triton compiles for each on this machine, without a GPU. Their results
on a GPU: tests/gpu/test_attention_kernels.py::test_split_kv_launch_shapes."""

from __future__ import annotations

import functools

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ember.kernels import paged_attention as attention  # noqa: E402


def test_unset_keeps_the_default_shape_and_bad_specs_say_what_is_expected() -> None:
    assert attention._split_kv_shape(None) == (None, 2, 4, 2)
    assert attention._split_kv_shape("") == (None, 2, 4, 2)
    assert attention._split_kv_shape("256,1,8") == (256, 1, 8, 2)
    assert attention._split_kv_shape("64,2,4,5") == (64, 2, 4, 5)
    for bad in ("256", "256,1", "100,1,4", "256,0,4", "256,1,3", "a,b,c", "64,2,4,0", "64,2,4,5,1"):
        with pytest.raises(ValueError, match="EMBER_ATTN_SPLIT_KV"):
            attention._split_kv_shape(bad)


# What a launch at Llama-3.1-8B shapes passes: bf16 pointers and, as Triton specializes them, strides divisible
# by 16 (without that the K/V loads would compile to scalar loads rather than the asynchronous copies measured).
POINTERS = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "out_ptr": "*bf16",
            "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "counters_ptr": "*i32", "block_tables_ptr": "*i32",
            "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32"}
STRIDES = ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_ks", "stride_kh", "stride_vb",
           "stride_vs", "stride_vh", "stride_ps", "stride_ph", "stride_ls", "stride_lh")
HOPPER_SHARED_BYTES = 227 * 1024  # the most one block may take


@functools.cache  # one compile (~1 s) per combination across the tests
def _compile(keys: int, min_tiles: int, warps: int, table_before_wait: bool,
             stages: int = 2) -> triton.compiler.CompiledKernel:
    fn = attention._split_kv_decode_kernel
    constexprs = dict(GROUP=4, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_M=16, SPLITS_P=32, TILE_N=keys,
                      DOT_PRECISION="tf32", USE_PDL=True, RELEASE_EARLY=True, ROW_BYTES=256, PREFETCH_KEYS=0,
                      MIN_TILES=min_tiles, TABLE_BEFORE_WAIT=table_before_wait)
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else POINTERS.get(n, "fp32" if n == "scale_log2e" else "i32")
                 for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in (*POINTERS, *STRIDES)}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    except FileNotFoundError as e:  # no ptxas beside this Triton
        pytest.skip(f"cannot assemble for sm_90 here: {e}")


# The largest buffers of the combinations the GPU tests and the prepared runs use (MIN_TILES and the warps change
# no buffer).
@pytest.mark.parametrize(("keys", "min_tiles", "warps", "stages", "table_before_wait"), [
    (128, 2, 4, 2, False), (256, 1, 8, 2, False), (64, 2, 4, 5, False), (256, 1, 8, 2, True), (128, 2, 4, 5, True)])
def test_split_kv_shapes_compile_for_sm90_within_its_shared_memory(keys: int, min_tiles: int, warps: int,
                                                                   stages: int, table_before_wait: bool) -> None:
    kernel = _compile(keys, min_tiles, warps, table_before_wait, stages)
    assert 0 < kernel.metadata.shared <= HOPPER_SHARED_BYTES
    # The first tile's one-iteration loop keeps a single buffer whatever the stages: no more shared memory.
    if table_before_wait:
        assert kernel.metadata.shared == _compile(keys, min_tiles, warps, False, stages).metadata.shared
    # K and V reach shared memory by asynchronous 16-byte copies.
    assert "cp.async.cg.shared.global" in kernel.asm["ptx"]


def test_256_key_tiles_double_buffered_do_not_fit() -> None:
    """The limit `_split_kv_shape` documents: two buffers of 256 bf16 keys of K and V are 256 KiB, over what a
    Hopper block may take (Triton refuses the launch)."""
    assert _compile(256, 1, 8, False, 5).metadata.shared > HOPPER_SHARED_BYTES


@pytest.mark.parametrize("table_before_wait", [False, True])
def test_the_block_table_is_read_before_the_wait_only_when_asked(table_before_wait: bool) -> None:
    lines = _compile(128, 1, 4, table_before_wait).asm["ptx"].splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    first_product = next(i for i, line in enumerate(lines) if "mma.sync" in line)
    before = [line for line in lines[:wait] if "ld.global" in line]
    # Before the wait: nothing written, and only scalar int32 loads (lengths, block-table entries), never q, K or V.
    assert not any(op in line for line in lines[:wait] for op in ("st.global", "atom.", "red."))
    assert all("ld.global.b32 " in line for line in before)
    # The lengths are 3 loads and the first tile's block-table entries more; without the option, none at all.
    assert len(before) > 3 if table_before_wait else not before
    # After the wait, up to the first product: the first tile's K and V copies; the lengths and block table too
    # (scalar int32 loads) only without the option. q, bf16, comes in 16-byte vectors either way.
    between = lines[wait:first_product]
    assert any("cp.async.cg.shared.global" in line for line in between)
    assert any("ld.global.v4.b32 " in line for line in between)
    scalar = [line for line in between if "ld.global.b32 " in line]
    assert not scalar if table_before_wait else len(scalar) > 3


@pytest.mark.parametrize(("stages", "buffers"), [(2, 1), (4, 1), (5, 2)])
def test_the_loop_over_tiles_double_buffers_k_and_v_from_5_stages(stages: int, buffers: int) -> None:
    """Why `EMBER_ATTN_SPLIT_KV` takes STAGES: with Triton 3.6 the paged loop (a block-table load, then K and V
    through it) keeps one tile of K and V in shared memory up to 4 stages and two from 5. If Triton changes
    this, the docs' account of the decode loop (and the stages worth sweeping) must change with it."""
    ttgir = _compile(64, 2, 4, False, stages).asm["ttgir"]
    assert f"!ttg.memdesc<{buffers}x64x128xbf16" in ttgir
    assert f"!ttg.memdesc<{buffers + 1}x64x128xbf16" not in ttgir
