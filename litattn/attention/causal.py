"""Standard causal softmax attention: the baseline every mechanism is compared against.

    y_i = sum_{j <= i} softmax_j(q_i . k_j / sqrt(d)) v_j        (RoPE on q, k when configured)

Runs the fused SDPA causal kernel; a sliding window (`sliding_window_size` in the model
config, Mistral v0.1) switches to a masked kernel.
"""

from litattn.attention.base import AttentionMechanism
from litattn.attention.registry import register_attention


@register_attention("causal")
class CausalAttention(AttentionMechanism):
    """Standard causal softmax attention (fused SDPA; sliding window if the model config sets one)."""
