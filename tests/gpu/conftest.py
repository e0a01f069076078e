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


def _list_builtins_once() -> None:
    """Find each module's Triton builtins once, not at every call of a `@triton.jit` helper.

    The interpreter re-patches `triton.language` at each such call, in every program of the grid, listing five
    modules and classes with `inspect.getmembers`: a third of the attention tests' time. A name that is not a
    builtin when first listed never becomes one (patching replaces builtins, and restoring puts them back), so
    the names found then are all a later call needs to look at; it patches exactly what the original would.
    """
    import inspect

    from triton.language import core
    from triton.runtime import interpreter

    names: dict[int, list[str]] = {}

    def patch_builtin(pkg, builder, scope) -> None:
        if id(pkg) not in names:
            names[id(pkg)] = [name for name, member in inspect.getmembers(pkg) if core.is_builtin(member)]
        for name in names[id(pkg)]:
            member = getattr(pkg, name)
            if core.is_builtin(member):
                interpreter._patch_attr(pkg, name, member, builder, scope)

    interpreter._patch_builtin = patch_builtin


if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
    _patch_interpreter_index()
    _list_builtins_once()
