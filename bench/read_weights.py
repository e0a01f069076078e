"""How fast a safetensors checkpoint's bytes reach the device through `ember.model.safetensors_io`, by piece size
and thread count (the loader's defaults first), against the `safetensors` library's tensor-by-tensor path.

    python3 bench/read_weights.py CHECKPOINT_DIR [--device cuda]
"""

from __future__ import annotations

import argparse
import glob
import time

import torch
from safetensors import safe_open

from ember.model.safetensors_io import PIECE_BYTES, read_header, read_tensors


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.empty(1, device=device)  # CUDA context outside the timings
    files = sorted(glob.glob(f"{args.checkpoint}/*.safetensors"))
    records = [r for f in files for r in read_header(f)]
    # Zeroed first: page faults of fresh memory would otherwise be charged to whichever method runs first.
    dsts = [torch.zeros(r.shape, dtype=r.dtype, device=device) for r in records]
    total = sum(r.nbytes for r in records)
    print(f"{len(files)} files, {len(records)} tensors, {total / 1e9:.2f} GB -> {device}")

    t = time.perf_counter()
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as st:
            for rec, dst in zip(records, dsts, strict=True):
                if rec.path == f:
                    dst.copy_(st.get_tensor(rec.name))
    _sync(device)
    el = time.perf_counter() - t
    print(f"safetensors get_tensor + copy_: {el:.2f} s = {total / el / 1e9:.1f} GB/s")

    for piece, threads in [(PIECE_BYTES, None), (4 << 20, None), (16 << 20, None), (32 << 20, None),
                           (PIECE_BYTES, 4), (PIECE_BYTES, 32)]:
        _sync(device)
        t = time.perf_counter()
        read_tensors(list(zip(records, dsts, strict=True)), threads=threads, piece_bytes=piece)
        _sync(device)
        el = time.perf_counter() - t
        print(f"read_tensors, {piece >> 20} MiB pieces, {threads or 'default'} threads: {el:.2f} s = "
              f"{total / el / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
