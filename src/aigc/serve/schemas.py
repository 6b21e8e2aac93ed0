"""Request and response bodies of the HTTP API, following OpenAI's legacy completions schema.

Types live here; value ranges are checked once, by `SampleConfig` and the server's `ServeConfig`
limits (see `aigc.serve.app`), so the messages a client sees are the same as on the command line.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_NULL_MEANS_DEFAULT = frozenset(
    (
        "prompt", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "n", "stream",
        "guidance_scale", "negative_prompt",
    )
)  # fmt: skip


def _null_allowed(schema: dict[str, Any]) -> None:
    """Say in the JSON schema that these fields also take null (meaning: the default)."""
    for name in _NULL_MEANS_DEFAULT:
        prop = schema["properties"][name]
        if "anyOf" in prop:
            prop["anyOf"].append({"type": "null"})
        else:
            prop["anyOf"] = [{"type": prop.pop("type")}, {"type": "null"}]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = Field(False, description="send a last chunk with the token counts")


class CompletionRequest(BaseModel):
    """`POST /v1/completions`. Types are strict (no "1" for 1); unknown fields are ignored, as
    OpenAI-compatible servers usually do."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True, json_schema_extra=_null_allowed)

    model: str = Field(description="model id from GET /v1/models")
    prompt: str | list[str] = Field("", description="text to continue, or a list of texts; '' starts a document")
    max_tokens: int = Field(16, description="most tokens to generate per choice (1..the server's --max-tokens-limit)")
    min_tokens: int = Field(0, description="extension: end-of-text is suppressed until this many tokens exist")
    temperature: float = Field(1.0, description="softmax temperature, >= 0; 0 = greedy")
    top_p: float = Field(1.0, description="nucleus sampling mass, in (0, 1]")
    top_k: int = Field(0, description="extension: keep only the k most likely tokens; 0 = off")
    repetition_penalty: float = Field(1.0, description="extension: >= 1; divides logits of seen tokens")
    n: int = Field(1, description="choices per prompt (n x prompts <= the server's --max-batch)")
    stop: str | list[str] | None = Field(None, description="stop when one of these strings appears")
    seed: int | None = Field(None, description="the same seed gives the same text; choice j uses seed + j")
    logprobs: int | None = Field(None, description="return log-probabilities and this many top alternatives (0..20)")
    stream: bool = Field(False, description="send server-sent events, one per token, ending with `data: [DONE]`")
    stream_options: StreamOptions | None = None
    label: str | None = Field(None, description="extension: condition on a label of the run (its control token)")
    guidance_scale: float = Field(
        1.0, description="extension: classifier-free guidance away from the negative prompt/label, in [1, 20]; 1 = off"
    )
    negative_prompt: str = Field("", description="extension: with guidance, the text to steer away from")
    negative_label: str | None = Field(None, description="extension: with guidance, the label to steer away from")
    user: str | None = Field(None, description="accepted and ignored")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """Clients (the openai package included) may send null for an option they leave unset."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in _NULL_MEANS_DEFAULT)}
        return data


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class Choice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    json_complete: bool | None = Field(
        None, description="extension, with response_format: false when the JSON was cut short (it does not parse)"
    )
    warning: str | None = Field(None, description="extension: why the JSON is incomplete")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "aigc"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class RunSummary(BaseModel):
    """`GET /v1/run`: what the playground shows about the loaded run."""

    model: str
    kind: str
    family: str = Field(description='architecture family: "Llama", "GPT-2", "LSTM", ... (aigc.models.kinds)')
    description: str = Field(description="the model in one line: family, total and trainable parameters, shape")
    params: int
    trainable: int | None = Field(None, description="parameters fine-tuning trained, as training recorded them")
    n_layer: int
    n_embd: int
    block_size: int
    vocab_size: int
    labels: list[str]
    data: dict = Field(description="provenance from the run's config.json (dataset path, source, ...)")
    step: int | None = Field(None, description="last evaluated training step, from metrics.jsonl")
    tokens: int | None = Field(None, description="training tokens seen at that step")
    val_bpb: float | None = Field(None, description="validation bits per byte at that step")
    best_val_bpb: float | None = Field(None, description="lowest validation bits per byte in metrics.jsonl")
    max_tokens_limit: int
    auth: bool = Field(description="whether /v1 routes need an API key")


class Health(BaseModel):
    status: Literal["ok", "degraded", "shutting_down"] = Field(
        description="degraded (answered with 503): the decode thread is not running, completions cannot finish"
    )
    model: str
    queued: int = Field(description="sequences waiting for a batch")
    running: int = Field(description="sequences being decoded now")
    batches: int = Field(description="batches decoded since start-up")
    sequences: int = Field(description="sequences decoded since start-up (sequences / batches = mean batch size)")


# ---------------------------------------------------------------------------------------------
# Chat completions (`POST /v1/chat/completions`)
# ---------------------------------------------------------------------------------------------

_CHAT_NULL_MEANS_DEFAULT = frozenset(("temperature", "top_p", "n", "stream", "logprobs"))


class ContentPart(BaseModel):
    """One part of a message's content; only `{"type": "text", "text": ...}` is read."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    # Typed str (so an unknown role gets aigc's message), documented as the enum it is.
    role: str = Field(
        description="system, user, assistant or tool",
        json_schema_extra={"enum": ["system", "user", "assistant", "tool"]},
    )
    content: str | list[ContentPart] | None = Field(None, description="text, or a list of text parts")
    name: str | None = Field(None, description="accepted and ignored")
    tool_calls: list[dict[str, Any]] | None = Field(None, description="assistant turns: the calls it made")
    tool_call_id: str | None = Field(None, description="tool turns: the id of the call this result answers")


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`: the conversation is rendered with the run's chat template."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)

    model: str = Field(description="model id from GET /v1/models")
    messages: list[ChatMessage] = Field(description="the conversation so far (system, user, assistant turns)")
    max_tokens: int | None = Field(None, description="most tokens per choice; default: what fits the context")
    max_completion_tokens: int | None = Field(None, description="the same as max_tokens (OpenAI's newer name)")
    temperature: float = Field(1.0, description="softmax temperature, >= 0; 0 = greedy")
    top_p: float = Field(1.0, description="nucleus sampling mass, in (0, 1]")
    n: int = Field(1, description="choices (<= the server's --max-batch)")
    stop: str | list[str] | None = Field(None, description="stop when one of these strings appears")
    seed: int | None = Field(None, description="the same seed gives the same text; choice j uses seed + j")
    logprobs: bool = Field(False, description="return the log-probability of each generated token")
    top_logprobs: int | None = Field(None, description="with logprobs: this many alternatives per token (0..20)")
    stream: bool = Field(False, description="send server-sent chat.completion.chunk events, then `data: [DONE]`")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in _CHAT_NULL_MEANS_DEFAULT)}
        return data


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as JSON text (they match the tool's parameters schema)")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]
    json_complete: bool | None = Field(
        None, description="extension, with response_format or tools: false when the JSON was cut short"
    )
    warning: str | None = Field(None, description="extension: why the JSON is incomplete")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
