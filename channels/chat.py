"""The chat channel: an assistant's reply streamed as text deltas while the engine generates it.

Chunks, in order, for each turn:
- `{"queued": n}` while the request waits for room in the batch (n = 1 is next);
- `{"delta": "text"}` as tokens arrive (a delta never ends inside a multi-byte character);
- a last chunk `{"delta": "...", "finish_reason": "stop" | "length" | "cancelled", "turn": i, "usage": {...}}`.

Each chunk is yielded as a `Checkpoint` carrying the token ids it took and the detokenizer's and stop
filter's state, so that another node can go on with a reply whose node died: it prefills the prompt
plus the tokens already sent and decodes on (greedy decoding then gives what an uninterrupted run
would; sampling goes on from the delivered text with fresh randomness). Only the first reply of a
stream can go on so; past it (pushed turns are not recorded) the stream ends with `producer_lost`.

Pushing a string, or `{"message": "..."}`, adds the next user turn to the same conversation and
generates again. With `keep_open` false (the default) the stream ends after the reply, unless turns were
pushed while it was generating (those are answered first); with `keep_open` true it waits for the next
pushed turn and ends when the client ends its input.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import Field, field_validator, model_validator

from streamplex.server.channel import CannotGoOn, Channel, ChannelError, ChannelStatus, Checkpoint, ParamsModel, StreamContext, model_status
from streamplex.server.engine import Engine, EngineError, GenerationRequest, SamplingParams, Stream
from streamplex.server.engine.detok import IncrementalDetokenizer
from streamplex.server.protocol import ErrorCode

if TYPE_CHECKING:
    from streamplex.server.engine.causal_lm import CausalLMRunner

MAX_STOP_CHARS = 100


class Message(ParamsModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatParams(ParamsModel):
    messages: list[Message] | None = Field(None, min_length=1, description="The conversation so far (role/content), ending with a user turn.")
    message: str | None = Field(None, description="A single user message (instead of `messages`).")
    system: str | None = Field(None, description="A system prompt to go with `message`.")
    max_tokens: int = Field(256, ge=1, le=32768, description="Most tokens to generate per reply (also bounded by the model's context).")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the most likely tokens up to this total probability.")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens (0: no limit).")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Makes sampling repeatable.")
    stop: list[str] = Field(default_factory=list, max_length=8, description="Strings that end the reply (not included in it).")
    model: str | None = Field(None, description="A configured chat model (default: the first).")
    keep_open: bool = Field(False, description="After a reply, wait for the next pushed turn instead of ending.")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_sizes(cls, value: list[str]) -> list[str]:
        if any(not 0 < len(s) <= MAX_STOP_CHARS for s in value):
            raise ValueError(f"stop strings must have 1 to {MAX_STOP_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _one_prompt(self) -> ChatParams:
        if (self.messages is None) == (self.message is None):
            raise ValueError("give either `messages` or `message`")
        if self.system is not None and self.messages is not None:
            raise ValueError("`system` goes with `message`; with `messages`, put a system turn first")
        return self

    def conversation(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        turns = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*turns, {"role": "user", "content": self.message or ""}]

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)


class StopText:
    """Cuts text at the first stop string, holding back any tail that could be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def pushed_turn(item: Any) -> str:
    """The user message in a pushed item: a string, or `{"message": "..."}`."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and set(item) == {"message"} and isinstance(item["message"], str):
        return item["message"]
    raise ChannelError(ErrorCode.INVALID_PARAMS, 'a pushed chat turn is a string or {"message": "..."}')


@dataclass(frozen=True, slots=True)
class GoingOn:
    """Where a reply stood when its node died, from its delivered chunks' positions."""

    ids: list[int]
    prefix: int
    read: int
    held: str

    @classmethod
    def of(cls, positions: list[Any]) -> GoingOn:
        """Rebuild it, or raise CannotGoOn when the chunks are not all of an unfinished first reply."""
        if not positions or not all(isinstance(p, dict) and p.get("turn") == 0 and not p.get("done") and isinstance(p.get("ids"), list) for p in positions):
            raise CannotGoOn("only a chat stream's unfinished first reply can go on on another node")
        last = positions[-1]
        ids = [i for p in positions for i in p["ids"]]
        state = cls(ids, last.get("prefix"), last.get("read"), last.get("held"))
        if not (all(type(i) is int for i in ids) and type(state.prefix) is int and type(state.read) is int and 0 <= state.prefix <= state.read <= len(ids)):
            raise CannotGoOn("the recorded positions are not a chat reply's")
        if not isinstance(state.held, str):
            raise CannotGoOn("the recorded positions are not a chat reply's")
        return state


def usage(stream: Stream, before: int = 0) -> dict[str, Any]:
    """Token counts and timings of one reply (`before`: tokens generated on the node that died, counted as completion)."""
    start, first, end = stream.submitted, stream.first_token, stream.finished or stream.submitted
    decode_seconds = end - first if first is not None else 0.0
    return {
        "prompt_tokens": stream.prompt_tokens - before,
        "completion_tokens": stream.completion_tokens + before,
        "time_to_first_token_ms": round((first - start) * 1000, 1) if first is not None else None,
        "duration_ms": round((end - start) * 1000, 1),
        "tokens_per_s": round((stream.completion_tokens - 1) / decode_seconds, 2) if decode_seconds > 0 else None,
    }


class ChatChannel(Channel):
    name = "chat"
    summary = "Assistant replies from a causal LM, token by token; push the next user turn to continue the conversation."
    Params = ChatParams
    accepts_push = True
    restartable = True
    needs_positions = True
    remote = True
    engine_families = ("chat",)

    @property
    def engine(self) -> Engine | None:
        """The server's engine; None when none is lent (then the channel reports itself unavailable)."""
        return self.services.engine

    def status(self) -> ChannelStatus:
        return model_status(self.engine, "chat")

    def check(self, params: ChatParams) -> None:
        models = self.engine.models("chat") if self.engine is not None else []
        if params.model is not None and params.model not in models:
            raise ChannelError(ErrorCode.INVALID_PARAMS, f"unknown model {params.model!r}; available: {', '.join(models) or 'none'}")

    async def stream(self, params: ChatParams, ctx: StreamContext) -> AsyncIterator[Any]:
        if self.engine is None:
            raise ChannelError(ErrorCode.UNAVAILABLE, "the model engine is not running")
        conversation = params.conversation()
        going_on = GoingOn.of(ctx.positions) if ctx.start else None
        pushes = ctx.pushed()
        for turn in itertools.count():
            reply: list[str] = []
            async for chunk in self._reply(params, conversation, turn, reply, ctx.tenant, going_on if turn == 0 else None):
                yield chunk
            conversation.append({"role": "assistant", "content": "".join(reply)})
            if not params.keep_open and ctx.inbox.empty():
                return
            item = await anext(pushes, None)
            if item is None:
                return
            conversation.append({"role": "user", "content": pushed_turn(item)})

    async def _reply(
        self, params: ChatParams, conversation: list[dict[str, str]], turn: int, reply: list[str], tenant: str, going_on: GoingOn | None = None
    ) -> AsyncIterator[Any]:
        """Generate one assistant turn, appending its text to `reply`; the prompt meets only `tenant`'s cached prefixes; with
        `going_on`, it starts from the tokens already sent."""
        assert self.engine is not None
        before = going_on.ids if going_on is not None else []
        try:
            runner = cast("CausalLMRunner", self.engine.runner("chat", params.model))
            prompt = runner.encode_chat(conversation)
            if len(prompt) >= runner.context_length:
                raise EngineError("invalid", f"the conversation is {len(prompt)} tokens; the model's context is {runner.context_length}")
            max_new = min(params.max_tokens, runner.context_length - len(prompt)) - len(before)
            if max_new < 1:
                raise CannotGoOn("the reply had used all its tokens")
            request = GenerationRequest(prompt + before, max_new, params.sampling(), tenant=tenant)
            stream = self.engine.submit(runner.name, len(request.prompt), request.max_new, request)
        except EngineError as exc:
            code = ErrorCode.INVALID_PARAMS if exc.code == "invalid" else ErrorCode.UNAVAILABLE
            raise ChannelError(code, exc.message) from None
        detok = IncrementalDetokenizer(runner.tokenizer)
        stops = StopText(params.stop)
        if going_on is not None:
            detok.restore(before, going_on.prefix, going_on.read)
            stops.held = going_on.held
            sent = detok.text(going_on.read)
            reply.append(sent[: len(sent) - len(going_on.held)])
        taken: list[int] = []  # token ids since the last chunk, recorded with the next one

        def checkpoint(data: dict[str, Any], done: bool = False) -> Checkpoint:
            prefix, read = detok.state()
            position = {"turn": turn, "ids": list(taken), "prefix": prefix, "read": read, "held": stops.held, "done": done}
            taken.clear()
            return Checkpoint(data, position)

        async with stream:
            while (update := await stream.next()) is not None:
                taken.extend(update.tokens)
                if update.queued is not None and not update.tokens:
                    yield checkpoint({"queued": update.queued})
                text, stopped = stops.feed(detok.push(update.tokens))
                finish = "stop" if stopped else update.finish
                if finish is None:
                    if text:
                        reply.append(text)
                        yield checkpoint({"delta": text})
                    continue
                if finish == "error":
                    raise ChannelError(ErrorCode.INTERNAL, "generation failed; see the server log")
                if not stopped:
                    tail, stopped = stops.feed(detok.flush())
                    text += tail if stopped else tail + stops.flush()
                    finish = "stop" if stopped else finish
                stream.cancel()
                reply.append(text)
                yield checkpoint({"delta": text, "finish_reason": finish, "turn": turn, "usage": usage(stream, len(before))}, done=True)
                return
