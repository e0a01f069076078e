"""POST /tokenize and /detokenize (vLLM's extension endpoints)."""

from __future__ import annotations

from ember.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from ember.server.serving_engine import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.resolve_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            text, ids = self.render_chat(req.messages, req.add_generation_prompt)
            if req.add_special_tokens:  # the template placed its own; vLLM adds BOS etc. only when asked
                ids = self.tokenizer.encode(text, add_special_tokens=True)
        else:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids,
                                token_strs=strs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.resolve_model(req.model)
        self.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens, skip_special_tokens=False))
