"""One request's generation: transformers' generate() over the swarm in its own thread, text out as it decodes.

The HTTP server's event loop must never block on the swarm, so each request
runs generate() in a thread of its own (each call opens its own inference
session, so requests run side by side). Tokens come back through a streamer
that decodes incrementally, holds back text that may be the start of a stop
sequence, and posts text deltas to the request's asyncio queue. Cancelling
(a client that went away, a stop sequence) sets a flag a StoppingCriteria
reads before the next step; generate() then returns and its session closes.

Sampling happens in a logits processor with a generator of the request's own,
so a `seed` reproduces a reply even while other requests sample concurrently
(torch's global RNG is shared by every thread).
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

log = logging.getLogger(__name__)

FINISH_STOP = "stop"  # an end-of-sequence token or a stop sequence
FINISH_LENGTH = "length"  # max_tokens reached
OUTCOME_CANCELLED = "cancelled"  # the reader went away
OUTCOME_ERROR = "error"
INCOMPLETE_CHARACTER = "\ufffd"  # what a decoder shows for a multi-byte character cut between tokens
SEED_BITS = 63


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class Sampler(LogitsProcessor):
    """Temperature and nucleus sampling with the request's own generator; the chosen token is the only finite
    score, so generate's greedy argmax picks it."""

    def __init__(self, temperature: float, top_p: float, seed: int | None):
        self.temperature = temperature
        self.top_p = top_p
        self.generator = torch.Generator().manual_seed(random.getrandbits(SEED_BITS) if seed is None else seed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > self.top_p  # the most likely token always stays
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        token = torch.multinomial(probs, 1, generator=self.generator)
        return torch.full_like(scores, -float("inf")).scatter_(-1, token, 0.0)


class _Cancelled(StoppingCriteria):
    def __init__(self, flag: threading.Event):
        self.flag = flag

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool)


class StopMatcher:
    """Cuts the text at the first stop sequence; holds back a tail that could still become one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text that is safe to show now."""
        text = self.pending + delta
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped, self.pending = True, ""
            return text[:min(cuts)]
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class _DeltaStreamer(BaseStreamer):
    """generate()'s streamer: skips the prompt, decodes the new tokens, hands text deltas to `generation`."""

    def __init__(self, generation: "Generation"):
        self.generation = generation
        self.prompt_seen = False
        self.ids: list[int] = []
        self.decoded = ""

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.generation.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith(INCOMPLETE_CHARACTER):
            self.generation._on_token("")
            return
        delta, self.decoded = text[len(self.decoded):], text
        self.generation._on_token(delta)

    def end(self) -> None:
        pass


@dataclass
class _Done:
    error: BaseException | None = None


@dataclass
class Generation:
    """Start with `start()`, read text with `async for delta in generation.text()`; then the counts are final.

    `on_finish(generation)` is called on the generation thread once generate() has returned and its session is
    closed, whether it finished, was cancelled or failed (see `outcome`)."""

    model: object
    tokenizer: object
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    on_finish: Callable[["Generation"], None] | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    error: BaseException | None = None
    completion_tokens: int = 0
    started_at: float = 0.0
    first_token_at: float | None = None
    _flag: threading.Event = field(default_factory=threading.Event)
    _queue: asyncio.Queue | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _matcher: StopMatcher | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def outcome(self) -> str | None:
        """The finish reason, or why there is none; None while generating."""
        if self.error is not None:
            return OUTCOME_ERROR
        return OUTCOME_CANCELLED if self.cancelled else self.finish_reason

    def start(self) -> None:
        """Call from the event loop that will read the text."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._matcher = StopMatcher(self.params.stop)
        self.started_at = time.perf_counter()
        threading.Thread(target=self._run, name="corolla-generation", daemon=True).start()

    def cancel(self) -> None:
        """Stop before the next step; the thread then closes the session on the workers."""
        self.cancelled = True
        self._flag.set()

    async def text(self) -> AsyncIterator[str]:
        """Non-empty text deltas until the end; raises what generate() raised."""
        while True:
            item = await self._queue.get()
            if isinstance(item, _Done):
                if item.error is not None:
                    raise item.error
                return
            yield item

    # ---- on the generation thread --------------------------------------------------------

    def _post(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the server shut down: nobody reads any more
            self.cancel()

    def _on_token(self, delta: str) -> None:
        self.completion_tokens += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self._matcher.stopped:
            return
        shown = self._matcher.feed(delta)
        if shown:
            self._post(shown)
        if self._matcher.stopped:
            self.finish_reason = FINISH_STOP
            self._flag.set()

    def _run(self) -> None:
        params = self.params
        streamer = _DeltaStreamer(self)
        kwargs = dict(max_new_tokens=params.max_tokens, do_sample=False, streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([_Cancelled(self._flag)]),
                      pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                      else next(iter(self.eos_token_ids), None),
                      eos_token_id=sorted(self.eos_token_ids) or None)
        if params.temperature > 0:
            kwargs["logits_processor"] = LogitsProcessorList([Sampler(params.temperature, params.top_p, params.seed)])
        ids = torch.tensor([self.prompt_ids])
        try:
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            new = out[0, ids.shape[1]:].tolist()
            if self.finish_reason is None:
                ended = bool(new) and new[-1] in self.eos_token_ids
                self.finish_reason = FINISH_STOP if ended else FINISH_LENGTH
            tail = self._matcher.flush()
            if tail:
                self._post(tail)
        except BaseException as e:  # handed to the reader, which answers the HTTP request with it
            if not self.cancelled:
                log.warning("generation failed: %s", e)
            self.error = e
        if self.on_finish is not None:
            try:
                self.on_finish(self)
            except Exception:
                log.exception("on_finish failed")
        self._post(_Done(self.error))
