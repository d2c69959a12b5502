"""Request bodies with OpenAI's names, as pydantic models, so FastAPI validates them and documents them.

Only the shape is checked here (types, ranges pydantic can express); the engine's `SamplingParams`
and `LLMEngine.validate` remain the single authority on what a request may ask for. Unknown fields
are ignored, as OpenAI and vLLM do, so newer clients keep working.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def unpaired_surrogate(value: Any) -> str | None:
    """The path of the first string (or dict key) in `value` holding a lone UTF-16 surrogate, else None.

    JSON may spell one (`"\\ud800"`) and Python decodes it, but it is not Unicode text: a tokenizer
    cannot encode it, and nothing generated from it could be sent back as UTF-8."""
    todo: list[tuple[Any, str]] = [(value, "")]
    while todo:
        v, path = todo.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path or "the request body"
        elif isinstance(v, dict):
            for k, item in v.items():
                key = f"{path}.{k}" if path else str(k)
                todo.append((k, key))
                todo.append((item, key))
        elif isinstance(v, (list, tuple)):
            todo.extend((item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(v))
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="after")
    def _text_is_unicode(self) -> "_Body":
        # nested bodies check themselves; this walks this model's own plain values (str, lists, dicts)
        own = {k: v for k, v in self.__dict__.items() if not isinstance(v, BaseModel)}
        bad = unpaired_surrogate(own)
        if bad is not None:
            raise ValueError(f"'{bad}' holds an unpaired UTF-16 surrogate (U+D800..U+DFFF), which is not valid text")
        return self


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: with include_usage, every chunk carries the usage so far


class JsonSchemaSpec(_Body):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class FunctionSpec(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier assistant turn's reasoning (V3.2/V4 encoders may render it)

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` (one of json / regex / choice / grammar / json_object)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: Any = None
    whitespace_pattern: str | None = None
    disable_fallback: bool = False  # there is no fallback backend: honoured as given
    disable_any_whitespace: bool = False  # JSON is always compact here: honoured as given
    disable_additional_properties: bool = False  # schemas compile strictly (no unlisted properties unless allowed)


class _Rejecting(_Body):
    """A body with fields we know (OpenAI's or vLLM's) but do not support: any value but the default is a 400
    naming the field, never silently ignored. `REJECTED`: name -> (accepted values, why)."""

    REJECTED: ClassVar[dict[str, tuple[tuple, str]]] = {}

    def check_supported(self) -> None:
        from dsv3.serve.errors import APIError

        for name, (ok, why) in self.REJECTED.items():
            v = getattr(self, name, None)
            if not any(v is o or (type(v) is type(o) and v == o) for o in ok):
                raise APIError(400, f"'{name}' is not supported by this server: {why}", param=name,
                               code="unsupported_parameter")


_VLLM_REJECTED: dict[str, tuple[tuple, str]] = {
    "use_beam_search": ((None, False), "beam search is not implemented"),
    "length_penalty": ((None, 1, 1.0), "it applies to beam search, which is not implemented"),
    "bad_words": ((None, []), "use logit_bias or allowed_token_ids"),
    "logits_processors": ((None, []), "server-side logits processors cannot be loaded by name"),
    "guided_whitespace_pattern": ((None,), "JSON is always generated compact"),
    "priority": ((None, 0), "the scheduler serves requests first come, first served"),
    "kv_transfer_params": ((None,), "disaggregated prefill is not implemented"),
    "vllm_xargs": ((None, {}), "there are no custom extensions"),
    "mm_processor_kwargs": ((None, {}), "the model takes text only"),
}


class _Sampling(_Rejecting):
    """Fields shared by both generation routes (OpenAI names, plus vLLM's extensions)."""

    model: str | None = None
    n: int = Field(default=1, ge=1, le=128)
    best_of: int | None = Field(default=None, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2 ** 63), lt=2 ** 63)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions (vLLM names)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # byte-level BPE never adds spaces: honoured either way
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    request_id: str | None = Field(default=None, pattern=r"^[!-~]{1,128}$")
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # vLLM: keep the last k prompt tokens (-1: the context)
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: Literal["xgrammar", "auto"] | None = None
    structured_outputs: StructuredOutputs | None = None
    # known, not supported: a 400 unless left at the default
    use_beam_search: Any = None
    length_penalty: Any = None
    bad_words: Any = None
    logits_processors: Any = None
    guided_whitespace_pattern: Any = None
    priority: Any = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None
    mm_processor_kwargs: Any = None

    REJECTED: ClassVar[dict[str, tuple[tuple, str]]] = dict(_VLLM_REJECTED)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None  # OpenAI's store metadata: accepted, no effect
    service_tier: str | None = Field(default=None, max_length=32)  # accepted, no effect (one tier)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)  # accepted: the prefix cache is automatic
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None  # accepted: the prefix cache is automatic
    prompt_cache_options: dict[str, Any] | None = None  # accepted: the prefix cache is automatic
    safety_identifier: str | None = Field(default=None, max_length=256)  # like `user`: accepted, no effect
    modalities: list[Literal["text"]] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    # known, not supported
    audio: Any = None
    functions: Any = None
    function_call: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None  # models with a thinking mode; checked against the model in serve/tool_formats.py
    store: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    echo: Any = None
    continue_final_message: Any = None
    documents: Any = None
    chat_template: Any = None
    chat_template_kwargs: dict[str, Any] | None = None  # thinking / enable_thinking / drop_thinking (serve/tool_formats.py)
    moderation: Any = None

    REJECTED: ClassVar[dict[str, tuple[tuple, str]]] = {
        **_VLLM_REJECTED,
        "audio": ((None,), "the model produces text only"),
        "functions": ((None, []), "the deprecated 'functions' API is not served: use 'tools'"),
        "function_call": ((None,), "the deprecated 'function_call' is not served: use 'tool_choice'"),
        "prediction": ((None,), "predicted outputs are not implemented"),
        "store": ((None, False), "chat completions are not stored (POST /v1/responses stores responses)"),
        "verbosity": ((None,), "the model has no verbosity control"),
        "web_search_options": ((None,), "there is no web search"),
        "echo": ((None, False), "echo is served by /v1/completions"),
        "continue_final_message": ((None, False), "the chat template cannot continue a final message"),
        "documents": ((None, []), "the chat template takes no documents"),
        "chat_template": ((None,), "the model's own chat template is used; a request cannot replace it"),
        "moderation": ((None,), "there is no moderation model"),
    }


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    max_tokens: int | None = Field(default=16, ge=0)  # 0: score the prompt only (needs echo)
    response_format: ResponseFormat | None = None
    add_special_tokens: bool = True
    prompt_embeds: Any = None

    REJECTED: ClassVar[dict[str, tuple[tuple, str]]] = {
        **_VLLM_REJECTED, "prompt_embeds": ((None,), "prompts are text or token ids")}


class EmbeddingRequest(_Rejecting):
    """OpenAI's embeddings body, plus vLLM's `truncate_prompt_tokens`, `add_special_tokens`, `normalize`."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    add_special_tokens: bool = True
    normalize: bool = True
    priority: Any = None

    REJECTED: ClassVar[dict[str, tuple[tuple, str]]] = {"priority": _VLLM_REJECTED["priority"]}


class ResponseContent(_Body):
    type: Literal["input_text", "output_text", "text"]
    text: str


class ResponseMessage(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ResponseContent]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFunctionCall(_Body):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class ResponseFunctionCallOutput(_Body):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[ResponseContent]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class ResponseTool(_Body):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseToolChoice(_Body):
    type: Literal["function"]
    name: str


class ResponseTextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseText(_Body):
    format: ResponseTextFormat | None = None
    verbosity: Any = None


class ResponsesRequest(_Rejecting):
    """OpenAI's Responses API body (text and function tools); see docs/serve.md for every field's status."""

    model: str | None = None
    input: str | list[ResponseFunctionCall | ResponseFunctionCallOutput | ResponseMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-(2 ** 63), lt=2 ** 63)
    stream: bool = False
    tools: list[ResponseTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponseToolChoice | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = Field(default=None, max_length=128)
    store: bool = True
    metadata: dict[str, str] | None = None
    text: ResponseText | None = None
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    service_tier: str | None = Field(default=None, max_length=32)
    truncation: Literal["disabled", "auto"] | None = None
    stream_options: dict[str, Any] | None = None  # include_obfuscation: no padding is ever added
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None  # accepted: the prefix cache is automatic
    prompt_cache_options: dict[str, Any] | None = None  # accepted: the prefix cache is automatic
    # known, not supported
    reasoning: Any = None
    include: Any = None
    top_logprobs: Any = None
    background: Any = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    context_management: Any = None
    moderation: Any = None

    REJECTED: ClassVar[dict[str, tuple[tuple, str]]] = {
        "reasoning": ((None, {}, {"effort": None}, {"effort": None, "summary": None}), "the model has no reasoning mode"),
        "include": ((None, []), "no extra output data (logprobs, reasoning, search results) is produced"),
        "top_logprobs": ((None, 0), "log-probabilities are served by /v1/chat/completions and /v1/completions"),
        "background": ((None, False), "responses run in the foreground"),
        "conversation": ((None,), "use previous_response_id to continue a conversation"),
        "prompt": ((None,), "stored prompt templates are not served"),
        "max_tool_calls": ((None,), "forced calls are limited by parallel_tool_calls"),
        "truncation": ((None, "disabled"), "the context is never truncated silently; shorten the input"),
        "context_management": ((None, []), "there is no server-side compaction of the context"),
        "moderation": ((None,), "there is no moderation model"),
    }

    def check_supported(self) -> None:
        super().check_supported()
        if self.text is not None and self.text.verbosity is not None:
            from dsv3.serve.errors import APIError

            raise APIError(400, "'text.verbosity' is not supported by this server: the model has no verbosity control",
                           param="text.verbosity", code="unsupported_parameter")


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
