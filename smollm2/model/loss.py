"""The fused, chunked LM-head cross-entropy: the head's gradient is computed in the forward, chunk by chunk.

    loss = linear_cross_entropy(h, head_weight, targets, vocab)   # == F.cross_entropy(h @ W.T, targets), fp32

The [N, vocab] logits are never held whole, nor kept for the backward: each chunk's softmax gives both its share of the
loss and d(loss)/d(logits), which two matmuls turn into dL/dh and dL/dW at once. The backward only scales them by the
incoming gradient. Logit columns >= `vocab` are storage padding: -inf, no probability mass, no gradient.
"""

from __future__ import annotations

import torch

# Logits per chunk (rows x padded vocab), rounded down to a power-of-two row count. CPU: 2**25 (512 rows of the 50,304
# vocab). CUDA: 2**28 (4,096 rows): near compiled F.cross_entropy's time at a fraction of its memory, and fewer host-side
# launches than 512-row chunks (docs/performance.md, "The fused, chunked loss").
CHUNK_ELEMENTS = 2**25
CHUNK_ELEMENTS_CUDA = 2**28


def chunk_rows(n: int, padded_vocab: int, device: torch.device) -> int:
    """Rows per chunk: the largest power of two whose logits fit the device's element budget (at least 1, at most n)."""
    elements = CHUNK_ELEMENTS_CUDA if device.type == "cuda" else CHUNK_ELEMENTS
    return min(n, 1 << max(0, (elements // padded_vocab).bit_length() - 1))


def _ce_chunk_eager(logits, targets, valid, vocab: int, need_grad: bool):
    """One chunk: (sum of CE over valid rows, d(sum CE)/d logits in the logits' dtype or None). In place, few passes."""
    dtype = logits.dtype
    logits = logits.float()
    logits[:, vocab:] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1)
    del logits
    safe_t = torch.where(valid, targets, 0).unsqueeze(1)
    loss = -(logp.gather(1, safe_t).squeeze(1) * valid).sum()
    if not need_grad:
        return loss, None
    probs = logp.exp_()  # softmax - onehot; rows with ignored targets are masked by the caller
    probs.scatter_add_(1, safe_t, torch.full(safe_t.shape, -1.0, device=probs.device))
    return loss, probs.to(dtype)


def _ce_chunk_functional(logits, targets, valid, vocab: int):
    """The same as `_ce_chunk_eager` with gradient, written for torch.compile (one fused read of the logits)."""
    dtype = logits.dtype
    columns = torch.arange(logits.shape[1], device=logits.device)
    logits = logits.float().masked_fill(columns >= vocab, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    safe_t = torch.where(valid, targets, 0).unsqueeze(1)
    loss = -(logp.gather(1, safe_t).squeeze(1) * valid).sum()
    return loss, (logp.exp() - (columns == safe_t).float()).to(dtype)


_compiled_chunk = None


def _ce_chunk_compiled(logits, targets, valid, vocab: int):
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_ce_chunk_functional, dynamic=False)
    return _compiled_chunk(logits, targets, valid, vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i @ W.T, t_i), the gradients computed chunk by chunk in the forward (they need only the chunk's
    softmax) and scaled by the incoming gradient in the backward. Per chunk: logits in the weight's dtype (bf16 under
    mixed precision, like the plain path), softmax and loss in fp32, the two gradient matmuls in the weight's dtype, dW
    summed in fp32."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab: int, need_grad: bool, compiled: bool):
        n = h.shape[0]
        rows = chunk_rows(n, weight.shape[0], h.device)
        valid = targets != -100
        count = valid.sum().clamp(min=1).float()
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = None
        for start in range(0, n, rows):
            h_c, t_c, v_c = h[start : start + rows], targets[start : start + rows], valid[start : start + rows]
            logits = h_c @ weight.t()
            if need_grad and torch.compiler.is_compiling():  # traced into an enclosing graph (whole-model compile)
                loss_c, g = _ce_chunk_functional(logits, t_c, v_c, vocab)
            elif compiled and need_grad:
                loss_c, g = _ce_chunk_compiled(logits, t_c, v_c, vocab)
            else:
                loss_c, g = _ce_chunk_eager(logits, t_c, v_c, vocab, need_grad)
            del logits
            loss += loss_c
            if need_grad:  # d(sum CE)/d logits = softmax - onehot on valid rows; the 1/count comes after the matmuls
                grad_h[start : start + rows] = (g @ weight) * (v_c.float() / count).unsqueeze(1)
                part = g.t() @ (h_c * v_c.unsqueeze(1).to(h_c.dtype))  # 0/1 row mask: exact in any dtype
                grad_w = part.float() if grad_w is None else grad_w.add_(part)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.div_(count).to(weight.dtype))
        return loss / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None, None


def linear_cross_entropy(h, weight, targets, vocab: int, compiled: bool = False):
    """Mean cross-entropy of the logits `h @ weight.T` (columns >= vocab masked) over targets != -100. h [N, C].

    `compiled`: run each chunk's softmax/gradient through torch.compile (one fused kernel; for GPUs)."""
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, vocab, need_grad, compiled)
