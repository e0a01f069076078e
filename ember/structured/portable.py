"""A request's compiled constraint on its way to the engine process.

The llguidance matcher a grammar holds cannot be pickled, and it is bound to the tokenizer object it was
compiled for. So the client sends the grammar's text (validated already: a bad schema got its 400 there) and the
engine process compiles it again for its own tokenizer, from its own cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.sampling_params import SamplingParams
from ember.tokenizer import Tokenizer


@dataclass(frozen=True)
class PortableGrammar:
    grammar: str  # llguidance's grammar text
    description: str


def portable_params(params: SamplingParams) -> SamplingParams:
    """`params` with an `LLGuidanceGrammar` replaced by its text; anything else is sent as it is."""
    so = params.structured_output
    if so is None:
        return params
    from ember.structured.llguidance_backend import LLGuidanceGrammar  # loaded already: it compiled `so`

    if not isinstance(so, LLGuidanceGrammar):
        return params
    return params.clone(structured_output=PortableGrammar(so.grammar, so.description))


def resolve_grammar(params: SamplingParams, tokenizer: Tokenizer) -> SamplingParams:
    """The engine process's side: a `PortableGrammar` compiled again for `tokenizer`."""
    so = params.structured_output
    if not isinstance(so, PortableGrammar):
        return params
    from ember.structured.compiler import get_compiler

    return params.clone(structured_output=get_compiler(tokenizer).compile_llguidance(so.grammar, so.description))
