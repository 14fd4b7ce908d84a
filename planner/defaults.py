"""The defaults every command, the planner and the runtime share, defined once."""

from __future__ import annotations

ALL_LINEAR = "all-linear"  # LoRA on every linear layer of a block (PEFT's spelling)
DEFAULT_SEQ_LEN = 512  # fine-tuning sequence length, and the inference prompt length planned for
DEFAULT_PROMPT_LEN = DEFAULT_SEQ_LEN
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_GLOBAL_BATCH = 16  # sequences per optimizer step when nothing else says
DEFAULT_LORA_R = 8
DEFAULT_MARGIN = 0.10  # share of a GPU's memory left free


def lora_alpha(r: int) -> int:
    """LoRA's scaling numerator for rank `r`: twice the rank (alpha / r = 2)."""
    return 2 * r


def parse_lora_targets(text: str) -> tuple[str, ...]:
    """`q_proj, v_proj` -> ("q_proj", "v_proj"); empty or all-linear -> ("all-linear",)."""
    targets = tuple(target.strip() for target in text.split(",") if target.strip())
    return targets or (ALL_LINEAR,)
