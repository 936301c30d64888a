"""flash-attn's Python API over the FlashAttention-2 kernels built into PyTorch's CUDA wheels.

The flash-attn wheel is source-only on PyPI and its kernels take about an hour of nvcc to build,
longer than a lent GPU is held. PyTorch's CUDA builds ship the same FlashAttention-2 forward and
backward kernels (`aten::_flash_attention_forward/_backward`, varlen included), so installing this
package (`pip install --no-build-isolation tools/gpu/flash_attn_torch`) lets transformers' unchanged
`flash_attention_2` path run on them: our call conventions (layouts, `cu_seqlens`, `max_seqlen`,
causal alignment, GQA) are then checked against real kernels. Never a runtime dependency.
"""

import torch

__version__ = "2.8.3+torch"


class _VarlenFlash(torch.autograd.Function):
    """One FlashAttention-2 varlen call: q (Tq, H, D), k/v (Tk, H, D), int32 cumulative lengths."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, window):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, False,
            scale=scale, window_size_left=window[0], window_size_right=window[1],
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng_state, unused)
        ctx.args = (max_q, max_k, dropout_p, causal, scale, window)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu_q, cu_k, rng_state, unused = ctx.saved_tensors
        max_q, max_k, dropout_p, causal, scale, window = ctx.args
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, causal, rng_state, unused,
            scale=scale, window_size_left=window[0], window_size_right=window[1],
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _window(window_size):
    left, right = window_size
    return (None if left < 0 else left, None if right < 0 else right)


def _expand_kv(q, k, v):
    """flash-attn's GQA: query head h reads key/value head h // (Hq / Hk)."""
    groups = q.shape[-2] // k.shape[-2]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=-2), v.repeat_interleave(groups, dim=-2)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), deterministic=False):
    k, v = _expand_kv(q, k, v)
    return _VarlenFlash.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q.int(), cu_seqlens_k.int(),
        int(max_seqlen_q), int(max_seqlen_k), dropout_p, softmax_scale, causal, _window(window_size),
    )


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    deterministic=False):
    """(B, Sq, H, D) x (B, Sk, Hk, D): each batch row is one varlen sequence (bottom-right causal)."""
    batch, len_q, len_k = q.shape[0], q.shape[1], k.shape[1]
    cu_q = torch.arange(0, (batch + 1) * len_q, len_q, device=q.device, dtype=torch.int32)
    cu_k = torch.arange(0, (batch + 1) * len_k, len_k, device=q.device, dtype=torch.int32)
    out = flash_attn_varlen_func(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, len_q, len_k, dropout_p=dropout_p,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size,
    )
    return out.view(batch, len_q, *out.shape[1:])


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("paged attention is not part of this stand-in; use flash_attn_func")
