"""ember: an OpenAI-compatible LLM inference server with its own engine."""

from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):  # importing the engine pulls in torch: only on demand
    if name == "LLM":
        from ember.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
