"""Which chat template renders a conversation with tools, and which parser reads the model's calls."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def chatml_tools_template() -> str:
    """ember's ChatML template with Hermes-style tools (ember/templates/chatml_tools.jinja)."""
    return resources.files("ember").joinpath("templates/chatml_tools.jinja").read_text(encoding="utf-8")


def supports_tools(template: str | None) -> bool:
    """A template that never mentions `tools` would silently drop them from the prompt."""
    return bool(template) and "tools" in template  # type: ignore[operator]


def tool_template_for(model_template: str | None) -> str | None:
    """The template to render requests that carry tools: None keeps the model's own (it handles tools);
    otherwise ember's ChatML one (the embedded SmolLM2's template is ChatML without tools)."""
    return None if supports_tools(model_template) else chatml_tools_template()


def detect_tool_parser(model_template: str | None) -> str:
    """The tool-call format a template teaches: Llama 3.1's JSON calls, else Hermes tags (ember's template too)."""
    t = model_template or ""
    if supports_tools(t) and ("<|python_tag|>" in t or "ipython" in t) and "<tool_call>" not in t:
        return "llama3_json"
    return "hermes"
