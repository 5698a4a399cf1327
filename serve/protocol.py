"""The OpenAI wire format the server speaks: request and response bodies as pydantic models.

Requests are validated strictly (a string where a number belongs is a 400, not a silent
cast), as the OpenAI API does. Fields the engine cannot honour are accepted only at their
neutral values (server.py checks them), and unknown fields are ignored, as vLLM does, so
that clients which send extras (lm-evaluation-harness passes its generation kwargs
through) still work. vLLM's extra sampling fields (top_k, min_p, repetition_penalty,
ignore_eos, stop_token_ids) are accepted as top-level body fields, which is where the
`openai` client's `extra_body` puts them.
"""

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Prompts: a string, a batch of strings, token ids, or a batch of token-id lists.
Prompt = str | list[str] | list[int] | list[list[int]]


class _Request(BaseModel):
  model_config = ConfigDict(strict=True, extra='ignore')


class StreamOptions(_Request):
  include_usage: bool = False


class _SamplingFields(_Request):
  """The fields shared by completions and chat completions."""

  model: str | None = None  # None: the one model this server serves
  n: int = 1
  stream: bool = False
  stream_options: StreamOptions | None = None
  stop: str | list[str] | None = None
  seed: int | None = None
  temperature: float | None = None  # None: 1.0, as OpenAI
  top_p: float | None = None
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  logit_bias: dict[str, float] | None = None
  user: str | None = None
  # vLLM's extra sampling fields.
  top_k: int | None = None  # 0 or -1: off
  min_p: float | None = None
  repetition_penalty: float | None = None
  ignore_eos: bool = False
  stop_token_ids: list[int] | None = None


class CompletionRequest(_SamplingFields):
  prompt: Prompt
  max_tokens: int | None = 16  # OpenAI's default for completions
  echo: bool = False
  logprobs: int | None = None
  suffix: str | None = None
  best_of: int | None = None


class ContentPart(_Request):
  model_config = ConfigDict(strict=True, extra='allow')
  type: str
  text: str | None = None


class ChatMessage(_Request):
  model_config = ConfigDict(strict=True, extra='allow')  # name, tool_calls: kept for templates
  role: str
  content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_SamplingFields):
  messages: list[ChatMessage]
  max_tokens: int | None = None  # None: up to the context limit
  max_completion_tokens: int | None = None
  logprobs: bool = False
  top_logprobs: int | None = None
  add_generation_prompt: bool = True  # vLLM's extra field


class TokenizeRequest(_Request):
  model: str | None = None
  prompt: str | None = None
  messages: list[ChatMessage] | None = None
  add_special_tokens: bool = True
  add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
  model: str | None = None
  tokens: list[int]


# --- responses --------------------------------------------------------------------------


def new_id(prefix: str) -> str:
  return f'{prefix}-{uuid.uuid4().hex}'


def now() -> int:
  return int(time.time())


class Usage(BaseModel):
  prompt_tokens: int
  completion_tokens: int
  total_tokens: int


class CompletionLogprobs(BaseModel):
  """The legacy completions shape: parallel lists, one entry per token."""

  tokens: list[str] = Field(default_factory=list)
  token_logprobs: list[float | None] = Field(default_factory=list)
  top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
  text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
  index: int
  text: str
  logprobs: CompletionLogprobs | None = None
  finish_reason: Literal['stop', 'length'] | None = None


class CompletionResponse(BaseModel):
  id: str
  object: Literal['text_completion'] = 'text_completion'
  created: int
  model: str
  choices: list[CompletionChoice]
  usage: Usage | None = None


class TopLogprob(BaseModel):
  token: str
  logprob: float
  bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
  top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
  content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
  role: Literal['assistant'] = 'assistant'
  content: str


class ChatChoice(BaseModel):
  index: int
  message: ChatResponseMessage
  logprobs: ChatLogprobs | None = None
  finish_reason: Literal['stop', 'length'] | None = None


class ChatCompletionResponse(BaseModel):
  id: str
  object: Literal['chat.completion'] = 'chat.completion'
  created: int
  model: str
  choices: list[ChatChoice]
  usage: Usage


class ChatDelta(BaseModel):
  role: Literal['assistant'] | None = None
  content: str | None = None


class ChatChunkChoice(BaseModel):
  index: int
  delta: ChatDelta
  logprobs: ChatLogprobs | None = None
  finish_reason: Literal['stop', 'length'] | None = None


class ChatCompletionChunk(BaseModel):
  id: str
  object: Literal['chat.completion.chunk'] = 'chat.completion.chunk'
  created: int
  model: str
  choices: list[ChatChunkChoice]
  usage: Usage | None = None


class ErrorBody(BaseModel):
  message: str
  type: str
  param: str | None = None
  code: str | None = None


class ErrorResponse(BaseModel):
  error: ErrorBody


def dump(model: BaseModel) -> dict[str, Any]:
  return model.model_dump(mode='json')
