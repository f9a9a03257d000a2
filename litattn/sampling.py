"""The sample a training run prints at validations and at its end."""

from __future__ import annotations

import torch

from litattn.args import LogArgs
from litattn.attention.hybrid import PREFIX_LEN
from litattn.data.base import has_prompts
from litattn.generate import generate


def sample_prompt(log: LogArgs, tokenizer, val_data) -> tuple[list[int] | None, int | None]:
    """The sample's prompt ids: log.sample_prompt, else the first validation example's prompt for instruction
    data (whose items have one), else none; and its prefix length: the whole prompt when the data's items carry
    `prefix_len` (as in training), else None."""
    if log.sample_prompt is not None:
        return tokenizer.encode(log.sample_prompt), None
    if has_prompts(val_data):
        ids = val_data.prompt_ids(0)
        return ids, len(ids) if PREFIX_LEN in val_data[0] else None
    return None, None


def write_sample(
    model, tokenizer, prompt_ids: list[int], max_tokens: int, seed: int, prefix_len: int | None = None
) -> None:
    max_tokens = min(max_tokens, model.max_seq_length - len(prompt_ids))
    if max_tokens < 1:
        print(f"(no sample: the {len(prompt_ids)}-token prompt fills the model's context)")
        return
    prompt = torch.tensor(prompt_ids, device=model.lm_head.weight.device)
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    print(f"\n--- sample ({max_tokens} tokens) ---\n{tokenizer.decode(prompt_ids)}", end="", flush=True)
    out = generate(
        model.eval(),
        prompt,
        max_tokens,
        temperature=0.8,
        top_k=50,
        eos_id=tokenizer.eos_id,
        generator=generator,
        prefix_len=prefix_len,
    )
    print(tokenizer.decode(out[len(prompt) :].tolist()) + "\n---")
