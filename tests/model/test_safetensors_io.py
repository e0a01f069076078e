"""safetensors_io: header parsing checked against the `safetensors` library, parallel reads, malformed files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ember.model.safetensors_io import TensorRecord, read_header, read_tensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(37, 13, generator=g).to(torch.bfloat16),
        "w.f32": torch.randn(5, 7, 3, generator=g),
        "w.f16": torch.randn(129, generator=g).to(torch.float16),
        "ids.i64": torch.randint(-9, 9, (11,), generator=g),
        "mask.bool": torch.rand(3, 5, generator=g) > 0.5,
        "w.fp8": torch.randn(6, 4, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8).cpu()


def _poisoned(rec: TensorRecord, device: str = "cpu") -> torch.Tensor:
    t = torch.empty(rec.shape, dtype=rec.dtype, device=device)
    t.reshape(-1).view(torch.uint8).fill_(0xAB)
    return t


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    return path


def test_header_matches_the_library(checkpoint: Path) -> None:
    records = {r.name: r for r in read_header(str(checkpoint))}
    with safe_open(str(checkpoint), framework="pt") as st:
        assert set(records) == set(st.keys())
        raw = checkpoint.read_bytes()
        for name in st.keys():
            expected = st.get_tensor(name)
            rec = records[name]
            assert (rec.dtype, rec.shape) == (expected.dtype, tuple(expected.shape))
            assert raw[rec.offset:rec.offset + rec.nbytes] == _bytes(expected).numpy().tobytes()


@pytest.mark.parametrize(("threads", "piece_bytes"), [(1, 16 << 20), (3, 7), (4, 64)])
def test_read_tensors_fills_destinations_byte_for_byte(checkpoint: Path, threads: int, piece_bytes: int) -> None:
    # Pieces of 7 bytes split elements across reads and threads: the bytes must still land in order.
    expected = _tensors()
    copies = [(rec, _poisoned(rec)) for rec in read_header(str(checkpoint))]
    read_tensors(copies, threads=threads, piece_bytes=piece_bytes)
    for rec, dst in copies:
        assert torch.equal(_bytes(dst), _bytes(expected[rec.name])), rec.name


def test_read_tensors_into_views_of_a_larger_tensor(checkpoint: Path) -> None:
    """A fused parameter's row slice (q of qkv) is a contiguous view: the rest of the tensor stays untouched."""
    rec = next(r for r in read_header(str(checkpoint)) if r.name == "w.bf16")
    fused = torch.zeros(37 * 3, 13, dtype=torch.bfloat16)
    read_tensors([(rec, fused.narrow(0, 37, 37))], piece_bytes=100)
    assert torch.equal(fused[37:74], _tensors()["w.bf16"])
    assert not fused[:37].any() and not fused[74:].any()


def test_read_tensors_refuses_a_destination_of_another_dtype_or_size(checkpoint: Path) -> None:
    rec = next(r for r in read_header(str(checkpoint)) if r.name == "w.f32")
    wrong_dtype, wrong_size = torch.zeros(rec.shape, dtype=torch.float64), torch.zeros(5, 7, 2)
    strided = torch.zeros(3, 7, 5).permute(2, 1, 0)
    for dst in (wrong_dtype, wrong_size, strided):
        with pytest.raises(ValueError, match="w.f32"):
            read_tensors([(rec, dst)])


def test_a_file_cut_short_after_its_header_was_read_raises(checkpoint: Path) -> None:
    records = read_header(str(checkpoint))
    with open(checkpoint, "r+b") as f:
        f.truncate(records[-1].offset + 1)
    copies = [(rec, torch.empty(rec.shape, dtype=rec.dtype)) for rec in records]
    with pytest.raises(ValueError, match="ended early"):
        read_tensors(copies, threads=2, piece_bytes=8)


def _write(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


@pytest.mark.parametrize(("header", "data", "length", "message"), [
    ({}, b"", 10**9, "header length"),
    ([1, 2], b"", None, "not a JSON object"),
    ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}}, b"xx", None, "malformed or unsupported"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"x" * 8, None, "malformed or unsupported"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"x" * 8, None, "do not fit"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"x" * 8, None, "do not fit"),
    ({"a": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}}, b"x" * 8, None, "do not fit"),
])
def test_malformed_headers_raise_with_the_file_name(tmp_path: Path, header: object, data: bytes,
                                                    length: int | None, message: str) -> None:
    path = _write(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(ValueError, match=message) as e:
        read_header(str(path))
    assert "bad.safetensors" in str(e.value)


def test_short_and_non_json_files_raise(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(str(short))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(ValueError, match="unreadable safetensors header"):
        read_header(str(garbage))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_read_tensors_to_the_gpu_through_pinned_buffers(checkpoint: Path) -> None:
    expected = _tensors()
    for threads, piece_bytes in ((1, 16 << 20), (4, 24), (2, 1000)):
        copies = [(rec, _poisoned(rec, "cuda")) for rec in read_header(str(checkpoint))]
        read_tensors(copies, threads=threads, piece_bytes=piece_bytes)
        for rec, dst in copies:
            assert torch.equal(_bytes(dst), _bytes(expected[rec.name])), rec.name
