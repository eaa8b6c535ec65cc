"""The OpenAI API's request schemas (pydantic) and error type, as `infer.serve` accepts them.

Fields we do not use are ignored, as OpenAI ignores them; values out of OpenAI's ranges are
rejected, so a client gets a 400 naming the parameter instead of a silent surprise.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

# More choices than this per request is refused: each one is a full decode on a shared worker.
MAX_N = 16
MAX_STOP_STRINGS = 4
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300


class APIError(Exception):
    """An error a client caused (or the server's), sent as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _Sampling(_Request):
    """What chat and text completions share."""

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)  # an int64, as OpenAI
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # Token id (as a string, as OpenAI sends it) -> bias added to its logit.
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(
        max_length=MAX_LOGIT_BIAS
    )] | None = None  # fmt: skip
    # Beyond OpenAI, as vLLM accepts them.
    top_k: StrictInt = Field(0, ge=0, le=2**31 - 1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]], Field(
        max_length=MAX_STOP_TOKEN_IDS
    )] | None = None  # fmt: skip
    ignore_eos: StrictBool = False  # keep going past the model's end-of-text (benchmarks)

    def bias_pairs(self, vocab_size: int) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs; raises APIError for a key that is no id."""
        pairs = []
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab_size:
                raise APIError(
                    400,
                    f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}",
                    param="logit_bias",
                )
            pairs.append((int(key), float(value)))
        return tuple(pairs)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def as_template_message(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens else self.max_tokens

    def num_logprobs(self) -> int | None:
        """How many top_logprobs per token (0: only the token's own); None: no logprobs."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    # A string, a list of strings (one completion each), token ids, or lists of token ids.
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]],
            Field(min_length=1),
        ]
    )
    max_tokens: StrictInt | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=5)  # OpenAI's limit for completions

    def token_limit(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        return self.logprobs


class EmbeddingRequest(_Request):
    model: StrictStr
    input: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    user: StrictStr | None = None
