"""Kernel tests run on CUDA, or on the CPU through Triton's interpreter with `TRITON_INTERPRET=1`."""

from __future__ import annotations

import os

import torch


def _patch_interpreter_index() -> None:
    """Let the interpreter use scalar tensors as `range` bounds under numpy >= 2.4.

    The interpreter holds a scalar as a 1-element array and converts it with `int(array)`, which numpy 2.4
    made an error for arrays that are not 0-d.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
    _patch_interpreter_index()
