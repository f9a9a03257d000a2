"""The output head and the cross-entropy as one step: logits are made and consumed a chunk of rows at a time.

Autograd's head keeps the (N, vocab) logits for the backward pass, zero-fills a (N, vocab) gradient for
`nll_loss` and runs a separate log-softmax backward over it: on a small model with a 4k vocabulary that is a
quarter of a CPU training step, most of it memory traffic. Here the forward pass of a training step computes
each chunk's logits, its loss and, since the loss is the last node of the graph, its gradient at once:

    p = softmax(h W^T + b)            per chunk of rows, in float32
    loss = sum_rows (lse - logit[target]) / n          n: rows whose target is not ignore_index
    dlogits = (p - onehot(target)) / n                 0 on ignored rows
    dh = dlogits W,   dW = dlogits^T h,   db = sum_rows dlogits

and keeps only dh (N, C), dW and db for the backward pass, which scales them by the incoming gradient. The
matmuls are the ones autograd runs; only the order of the sums differs (float rounding). Without gradients
(evaluation) it is the chunked loss alone.

Under bf16 autocast (bf16-mixed) the head computes as autocast would, explicitly: `compute_dtype` bf16 for the
three matmuls (h, W and the chunk's dlogits cast to bf16; each matmul accumulates in fp32 inside), the softmax, the
loss and the sums over chunks in float32, dW and db returned in the weights' own dtype (the fp32 masters). fp16
autocast keeps autograd's head: its gradients, made here before the loss is scaled, could underflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ROWS = 512
"""Rows per chunk: a (512, vocab) float32 block of logits stays in cache-sized pieces (8 MiB at 4k)."""


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index, chunk_rows, wants, compute_dtype):
        """wants: which of h, weight, bias need a gradient (a frozen head, as in LoRA, costs no dW).
        compute_dtype: the matmuls' dtype (None: the weights' own)."""
        with torch.autocast(h.device.type, enabled=False):  # the dtypes are chosen here
            return _LinearCrossEntropy._forward(ctx, h, weight, bias, targets, ignore_index, chunk_rows, wants,
                                                compute_dtype)  # fmt: skip

    @staticmethod
    def _forward(ctx, h, weight, bias, targets, ignore_index, chunk_rows, wants, compute_dtype):
        want_grad = any(wants)
        cast = compute_dtype is not None and compute_dtype != weight.dtype
        w = weight.to(compute_dtype) if cast else weight
        b = bias.to(compute_dtype) if cast and bias is not None else bias
        valid = targets != ignore_index
        n = valid.sum().clamp(min=1).to(torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if wants[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants[1] else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if wants[2] else None
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h_c, t_c, v_c = h[rows], targets[rows], valid[rows]
            h_c = h_c.to(w.dtype) if cast else h_c
            logits = F.linear(h_c, w, b).float()  # (rows, V)
            lse = torch.logsumexp(logits, dim=-1)
            safe = t_c.clamp(min=0)  # ignored rows point at class 0; masked below
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            loss += ((lse - picked) * v_c).sum()
            if not want_grad:
                continue
            p = logits.sub_(lse[:, None]).exp_()  # the softmax, in the logits' buffer
            p.scatter_add_(1, safe[:, None], torch.full_like(picked[:, None], -1.0))
            p.mul_((v_c.to(p.dtype) / n)[:, None])
            p_w = p.to(w.dtype)
            if grad_h is not None:
                grad_h[rows] = p_w @ w
            if grad_w is not None and cast:
                grad_w += p_w.t() @ h_c  # a bf16 matmul, as autocast's; summed over chunks in float32
            elif grad_w is not None:
                grad_w.addmm_(p.t(), h_c.float())
            if grad_b is not None:
                grad_b += p.sum(dim=0)
        if want_grad:
            ctx.save_for_backward(
                grad_h,
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype),
            )
        return loss / n

    @staticmethod
    def backward(ctx, grad_output):
        grads = tuple(None if g is None else g * grad_output.to(g.dtype) for g in ctx.saved_tensors)
        return (*grads, None, None, None, None, None)


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int = CHUNK_ROWS,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `F.linear(h, weight, bias)` against targets, h (N, C), targets (N,) long, its matmuls
    in `compute_dtype` (None: the weights' dtype; bf16 under bf16 autocast, as `fused_head_dtype` says)."""
    grad = torch.is_grad_enabled()
    wants = tuple(grad and t is not None and t.requires_grad for t in (h, weight, bias))
    return _LinearCrossEntropy.apply(h, weight, bias, targets, ignore_index, chunk_rows, wants, compute_dtype)


def fused_head_dtype(device_type: str) -> tuple[bool, torch.dtype | None]:
    """Whether the fused head applies under the current autocast state, and the dtype its matmuls take: outside
    autocast, yes (the weights' dtype); under bf16 autocast, yes (bf16); under fp16 autocast, no (see above)."""
    if not torch.is_autocast_enabled(device_type):
        return True, None
    dtype = torch.get_autocast_dtype(device_type)
    return dtype == torch.bfloat16, dtype
