"""Autoregressive sampling with the KV cache, and the `litattn generate` entry point.

Two phases:

    prefill: one forward over the whole prompt fills every layer's cache
    decode:  one token at a time at input_pos = its position; sample from the last logits

With `stream_window` (and `sink_size`) the cache is a sink + recent window (litattn/streaming.py,
StreamingLLM): it keeps the first S and the latest W tokens with positions re-assigned inside it, so
generation runs for any length in bounded memory. A prompt longer than S + W is prefilled in pieces: the
first S + W tokens at once, then `stream_chunk` tokens at a time, each chunk evicting as many old tokens.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from litattn.args import check_range, check_seed, start_work
from litattn.attention.hybrid import PREFIX_LEN
from litattn.checkpoint import has_tokenizer, load_with_tokenizer, weights_dtype
from litattn.data.instructions import Example, format_prompt
from litattn.data.prompt_truncation import prompt_scores, protected_spans
from litattn.precision import choose_precision
from litattn.streaming import DEFAULT_SINK_SIZE, SinkWindowCache, check_streamable, check_streaming_args
from litattn.tokenizer import Tokenizer
from litattn.truncation import Importance, Protect, windowed_token_scores
from litattn.truncation import truncate as drop_tokens

if TYPE_CHECKING:
    from litattn.model import GPT


def sample(
    logits: Tensor,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token id (a 1-element tensor) from logits (vocab,).

    temperature 0 is greedy. top_k keeps the k most likely tokens; top_p keeps the smallest set of
    most likely tokens whose probability reaches top_p (nucleus sampling). Both apply after temperature.
    """
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the most likely one always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(0, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    check_range("temperature", temperature, ge=0)  # 0: greedy
    check_range("top_k", top_k, ge=1, null="all tokens")
    check_range("top_p", top_p, gt=0, le=1, null="all tokens")


@torch.no_grad()
def generate(
    model: GPT,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    stream: Callable[[int], None] | None = None,
    stream_window: int | None = None,
    sink_size: int | None = None,
    stream_chunk: int | None = None,
    prefix_len: int | None = None,
    rethink_every: int | None = None,
) -> Tensor:
    """Continue prompt (T,) by up to max_new_tokens; returns prompt + new tokens, 1-D.

    Stops after eos_id (which is included in the output and streamed). Only ids below
    config.vocab_size are sampled: the padded embedding rows are no tokens. stream(id) is called
    for each new token as soon as it is chosen. The KV cache is cleared afterwards.

    stream_window W (with sink_size S, default 4): a sink + recent-window cache of S + W slots
    (litattn.streaming), for prompts and outputs of any length; a prompt longer than S + W is prefilled
    `stream_chunk` tokens at a time once the cache is full (default max(1, W // 4): each prompt token sees
    at least the latest 3W/4 tokens and the sinks; 1 is the exact token-by-token rule). None: ordinary
    generation within the model's context.

    prefix_len: the prompt's first prefix_len tokens are a prefix to be read as a whole (e.g. an instruction
    prompt): handed to the prefill as `prefix_len` metadata when the attention mechanism reads it (declares it
    in `metadata_keys`; hybrid sees the prefix bidirectionally), ignored by mechanisms that do not.

    rethink_every k (default: the mechanism's `rethink_every`): after every k new tokens, the whole text so far
    becomes the prefix: one forward from slot 0 over prompt + output with `prefix_len` = its length rebuilds the
    cache, and its last logits choose the next token (for a mechanism that reads `prefix_len`; not streaming).
    The logits after each rethink are those of a fresh full forward with that prefix.
    """
    _check_sampling(temperature, top_k, top_p)
    check_streaming_args(stream_window, sink_size, stream_chunk)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = prompt.flatten()
    T, context = prompt.numel(), model.max_seq_length
    if T == 0:
        raise ValueError("The prompt is empty: generation needs at least one token to condition on")
    streaming = stream_window is not None
    if not streaming and T + max_new_tokens - 1 > context:  # the last new token is sampled, never read
        raise ValueError(
            f"prompt has {T} tokens + {max_new_tokens} new exceeds the model's context of {context} (the model reads "
            f"all but the last); lower max_new_tokens or {TOO_LONG_WAYS}"
        )
    device = model.lm_head.weight.device
    prompt = prompt.to(device=device, dtype=torch.long)
    vocab_size = model.config.vocab_size
    metadata = {}  # the prompt's attention metadata, for the prefill
    if prefix_len is not None and PREFIX_LEN in model.mechanism.metadata_keys:
        if not 0 <= prefix_len <= T:
            raise ValueError(f"prefix_len must be between 0 and the prompt's {T} tokens, got {prefix_len}")
        if streaming:
            check_prefix_streamable(model)
        metadata[PREFIX_LEN] = torch.tensor([prefix_len], device=device)
    every = check_rethink(model, rethink_every, streaming)
    tokens = [prompt]
    if streaming:
        cache = SinkWindowCache(model, sink_size, stream_window)
        chunk = max(1, stream_window // 4) if stream_chunk is None else stream_chunk

        def prefill(ids: Tensor) -> Tensor:
            for piece in cache.feed(ids.view(1, -1), chunk):
                last = piece[0, -1]  # only the last token's logits are needed
            return last

        def step(next_id: Tensor, slot: int) -> Tensor:
            return cache.forward(next_id.view(1, 1))[0, -1]

        close = cache.close
    else:
        model.set_kv_cache(1, max_seq_length=T + max_new_tokens - 1)  # every token read: all but the last

        def prefill(ids: Tensor) -> Tensor:
            return model(ids.view(1, -1), input_pos=torch.arange(T, device=device), **metadata)[0, -1]

        def step(next_id: Tensor, slot: int) -> Tensor:
            return model(next_id.view(1, 1), input_pos=torch.tensor([slot], device=device))[0, -1]

        def rethink(ids: Tensor) -> Tensor:  # the whole text as the prefix, read again; the cache rebuilt
            n = ids.numel()
            prefix = torch.tensor([n], device=device)
            return model(ids.view(1, -1), input_pos=torch.arange(n, device=device), **{PREFIX_LEN: prefix})[0, -1]

        close = model.clear_kv_cache
    try:
        logits = prefill(prompt)
        for i in range(max_new_tokens):
            next_id = sample(logits[:vocab_size], temperature, top_k, top_p, generator)
            tokens.append(next_id)
            token = int(next_id)
            if stream is not None:
                stream(token)
            if token == eos_id or i + 1 == max_new_tokens:
                break
            if every is not None and (i + 1) % every == 0:
                logits = rethink(torch.cat(tokens))
            else:
                logits = step(next_id, T + i)
    finally:
        close()
    return torch.cat(tokens)


def _prompt_scorer(strategy: str | None, importance: Path | None, prompt_budget: int | None, checkpoint_dir: Path):
    """The dictionary of a dictionary strategy, loaded (and the options and its tokenizer checked) before the model
    loads."""
    if strategy is None:
        if importance is not None or prompt_budget is not None:
            raise ValueError("importance and prompt_budget are read with --truncate only; set --truncate or drop them")
        return None
    if strategy not in ("left", "idf", "attention", "attention_live"):
        raise ValueError(f"truncate must be one of left, idf, attention, attention_live, got {strategy!r}")
    if (strategy in ("idf", "attention")) != (importance is not None):
        raise ValueError(
            f"truncate {strategy} {'needs' if importance is None else 'reads no'} importance (a dictionary from "
            "`litattn truncate build`, with --method idf for idf)"
        )
    if importance is None:
        return None

    imp = Importance.load(importance)
    if has_tokenizer(checkpoint_dir):  # else loading the checkpoint says what is missing
        imp.check_tokenizer(Tokenizer(checkpoint_dir))
    return imp


def _truncate_prompt(ids: list[int], budget: int, strategy: str, imp, model, head: int, tail: int) -> list[int]:
    """ids cut to `budget` tokens by `strategy`, the first `head` and last `tail` kept; a note on stderr."""
    if len(ids) <= budget:
        return ids
    if head + tail > budget:
        raise ValueError(
            f"prompt_budget {budget} is below the {head + tail} prompt tokens truncation must keep; raise "
            "prompt_budget or lower protect_last"
        )
    live = lambda prompts: windowed_token_scores(model, prompts)  # noqa: E731 (the generating model scores itself)
    scores = prompt_scores("input_left" if strategy == "left" else strategy, [ids], imp, live)[0]
    kept = drop_tokens(ids, budget, scores=scores, protect=Protect(first=head, last=tail))
    print(
        f"litattn: note: the prompt was truncated from {len(ids)} to {len(kept)} tokens ({strategy})", file=sys.stderr
    )
    return kept


TOO_LONG_WAYS = (
    "shorten the prompt, drop some of its tokens with --truncate (left, idf, attention, attention_live), "
    "extend the context with --context (RoPE extrapolation, or Self-Extend via --attention) or stream it with "
    "--stream_window"
)
"""The ways past a prompt too long for the model's context, which its error names."""


def check_rethink(model, rethink_every: int | None, streaming: bool) -> int | None:
    """How often generation re-reads the text as a prefix (`rethink_every`, else the mechanism's), checked:
    the mechanism must read a prefix, and a prefix is never streamed."""
    every = model.mechanism.rethink_every if rethink_every is None else rethink_every
    if every is not None:
        check_range("rethink_every", every, ge=1, null="never")
        if PREFIX_LEN not in model.mechanism.metadata_keys:
            raise ValueError(
                f"rethink_every re-reads the text as a prefix, and attention {model.config.attention['name']!r} "
                "reads none (no prefix_len); use a mechanism that does (hybrid) or leave rethink_every out"
            )
        if streaming:
            check_prefix_streamable(model)
    return every


def check_prefix_streamable(model) -> None:
    """A prompt prefix (hybrid's `prefix_len`, from --instruction) is read whole: it cannot be streamed."""
    if PREFIX_LEN in model.mechanism.metadata_keys:
        raise ValueError(
            f"A prompt prefix (prefix_len, which attention {model.config.attention['name']!r} reads from "
            "--instruction) cannot be streamed: drop stream_window, or give the text as --prompt"
        )


def _fit_context(max_new_tokens: int, prompt_tokens: int, context: int) -> int:
    """max_new_tokens, lowered (with a note on stderr) to the room the prompt leaves in the model's context (the
    last new token is sampled, never read: a prompt of `context` tokens still gets one)."""
    room = context - prompt_tokens + 1
    if room < 1:
        raise ValueError(
            f"The prompt has {prompt_tokens} tokens, which leave no room in the model's context of {context} "
            f"for a new token; {TOO_LONG_WAYS}"
        )
    if max_new_tokens > room:
        print(
            f"litattn: note: max_new_tokens lowered from {max_new_tokens} to {room}, the room the "
            f"{prompt_tokens}-token prompt leaves in the model's context of {context}",
            file=sys.stderr,
        )
    return min(max_new_tokens, room)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces that are safe to print.

    Decoding ids one at a time breaks multi-byte characters (a byte-level BPE token may hold half
    of one) and loses sentencepiece's leading spaces. So each step decodes a short window with a
    few tokens of left context, prints what the new tokens added, and holds text back while it
    ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Any, context_ids: list[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context_ids)
        self.prefix_offset = max(len(self.ids) - 4, 0)  # context decoded but not printed
        self.read_offset = len(self.ids)  # ids before this are printed

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]


def main(
    checkpoint_dir: Path,
    prompt: str = "def ",
    instruction: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 1234,
    attention: dict | None = None,
    context: int | None = None,
    stream_window: int | None = None,
    sink_size: int | None = None,
    stream_chunk: int | None = None,
    truncate: Literal["left", "idf", "attention", "attention_live"] | None = None,
    importance: Path | None = None,
    prompt_budget: int | None = None,
    protect_last: int = 8,
    rethink_every: int | None = None,
    precision: str = "auto",
) -> str:
    """Generate text from a checkpoint, printing it as it is produced.

    Args:
        checkpoint_dir: A checkpoint directory (model.safetensors, model_config.yaml, tokenizer).
        prompt: Text to continue.
        instruction: Ask a finetuned model: this instruction, in the prompt template of `litattn finetune`,
            replaces `prompt`, and the whole prompt is its prefix (`prefix_len`, for attention that reads one).
        max_new_tokens: Most tokens to generate (fewer if the end-of-sequence token comes first, or if the
            model's context has less room left after the prompt: then a note on stderr says so; streaming has
            no such limit).
        temperature: Softmax temperature; 0 picks the most likely token (greedy).
        top_k: Sample among the k most likely tokens only (None: all).
        top_p: Sample among the most likely tokens whose probability sums to top_p (None: all).
        seed: Seed of the sampling generator, for reproducible output (0 to 2**32 - 1).
        attention: Run with another attention spec than the checkpoint's, e.g. `{name: ssa}`;
            keys without a `name` update the saved spec's options.
        context: Accept up to this many tokens, beyond what the attention handles at block_size (RoPE
            positions extrapolate); default: what the attention handles.
        stream_window: Stream with a sink + recent-window KV cache (StreamingLLM) that keeps the first
            `sink_size` tokens and the latest `stream_window`, positions re-assigned inside it: prompt and
            output of any length in bounded memory (RoPE models; sink_size + stream_window at most the
            model's context). The window counts the token being processed, StreamingLLM's `recent_size` does
            not: their recent_size R is stream_window R + 1 here. None: ordinary generation within the context.
        sink_size: Attention-sink tokens kept at the start of the cache when streaming (default 4; 0: window only).
        stream_chunk: Tokens per forward when prefilling a prompt longer than sink_size + stream_window, once
            the cache is full (each chunk evicts as many old tokens); default max(1, stream_window // 4);
            1 is the exact token-by-token rule.
        truncate: Fit a prompt longer than `prompt_budget` by dropping its start (left), or its least important
            tokens: by an importance dictionary (attention, idf: `importance`, from `litattn truncate build`) or
            scored by this model on the prompt itself, in windows of its context (attention_live). The survivors
            keep their order; a note on stderr says how many went. None: a prompt that does not fit is an error.
        importance: The dictionary of truncate attention / idf (JSON from `litattn truncate build`).
        prompt_budget: Tokens the prompt may keep after truncation; default: the model's context minus
            max_new_tokens (at least 1).
        protect_last: Truncation never drops the prompt's last this many tokens (what the continuation follows);
            with --instruction the prompt template and its end are kept instead.
        rethink_every: Every this many new tokens, read the whole text again as the prefix (hybrid attention:
            the thought loop runs over prompt and output, the cache is rebuilt); default: the checkpoint's
            attention option `rethink_every` (none).
        precision: The dtype weights and KV cache compute in: auto (bf16-true where the device has native bf16,
            else 32-true: litattn/precision.py), 32-true, bf16-true, 16-true or 64-true.

    Returns:
        The generated text (without the prompt).
    """
    check_range("max_new_tokens", max_new_tokens, ge=1)  # every argument before the model loads
    _check_sampling(temperature, top_k, top_p)
    check_seed("seed", seed)
    check_range("context", context, ge=1, null="what the attention handles")
    check_streaming_args(stream_window, sink_size, stream_chunk)
    check_range("prompt_budget", prompt_budget, ge=1, null="the context minus max_new_tokens")
    check_range("protect_last", protect_last, ge=0)
    check_range("rethink_every", rethink_every, ge=1, null="the attention's option")
    choice = choose_precision(precision, training=False)
    if not choice.precision.endswith("-true"):
        raise ValueError(f"precision {precision!r}: generate computes in the weights' own dtype; pass auto or a "
                         "-true precision (32-true, bf16-true, 16-true, 64-true)")  # fmt: skip
    start_work()
    # a bad dictionary fails before the model loads
    scores_of = _prompt_scorer(truncate, importance, prompt_budget, checkpoint_dir)
    if instruction is not None:
        prompt = format_prompt(instruction)
    model, tokenizer, _ = load_with_tokenizer(
        checkpoint_dir, dtype=weights_dtype(choice.precision), attention=attention, context=context
    )
    device = model.lm_head.weight.device
    model.eval()
    if stream_window is not None:
        sink_size = DEFAULT_SINK_SIZE if sink_size is None else sink_size
        check_streamable(model, sink_size + stream_window)
        if instruction is not None:
            check_prefix_streamable(model)  # before the prompt is printed
    check_rethink(model, rethink_every, stream_window is not None)  # before the prompt is printed
    ids = tokenizer.encode(prompt, bos=getattr(tokenizer, "use_bos", False))  # as the checkpoint's tokenizer does
    if not ids:
        raise ValueError("The prompt is empty: generation needs at least one token to condition on")
    if truncate is not None:
        budget = prompt_budget or max(1, model.max_seq_length - max_new_tokens)
        if instruction is not None:  # the template around the instruction stays
            head, tail = (int(n) for n in protected_spans([Example(instruction, "")], tokenizer, True)[0])
        else:
            head, tail = 0, protect_last
        ids = _truncate_prompt(ids, budget, truncate, scores_of, model, head, tail)
        prompt = tokenizer.decode(ids)
    if stream_window is None:
        max_new_tokens = _fit_context(max_new_tokens, len(ids), model.max_seq_length)
    generator = torch.Generator(device=device).manual_seed(seed)
    decoder = IncrementalDecoder(tokenizer, ids)
    pieces: list[str] = []

    def stream(token: int) -> None:
        if token == tokenizer.eos_id:
            return
        piece = decoder.push(token)
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    sys.stdout.write(prompt)
    start = time.perf_counter()
    out = generate(
        model,
        torch.tensor(ids, dtype=torch.long),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=tokenizer.eos_id,
        generator=generator,
        stream=stream,
        stream_window=stream_window,
        sink_size=sink_size,
        stream_chunk=stream_chunk,
        prefix_len=len(ids) if instruction is not None else None,
        rethink_every=rethink_every,
    )
    elapsed = time.perf_counter() - start
    pieces.append(decoder.flush())
    sys.stdout.write(pieces[-1] + "\n")
    sys.stdout.flush()
    n = len(out) - len(ids)
    said = f"Generated {n} tokens in {elapsed:.2f} s: {n / max(elapsed, 1e-9):.1f} tokens/s"
    print(f"{said}; precision {choice.precision} ({choice.reason})", file=sys.stderr)
    return "".join(pieces)
