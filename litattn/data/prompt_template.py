"""The instruction prompt template, apart from the data modules so that prompt truncation can read it too."""

from __future__ import annotations

ALPACA_PROMPT: dict[str, str] = {
    "input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}
"""The prompt template (Alpaca style): the variant with an input when an example has one, else the shorter one."""


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt the model sees before its response (also what `litattn generate` should send a finetuned model)."""
    if input:
        return ALPACA_PROMPT["input"].format(instruction=instruction, input=input)
    return ALPACA_PROMPT["no_input"].format(instruction=instruction)
