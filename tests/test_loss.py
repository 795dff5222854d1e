"""The fused, chunked LM-head cross-entropy (smollm2/model/loss.py) against plain F.cross_entropy over the full logits."""

import pytest
import torch
import torch.nn.functional as F

import smollm2.model.loss as loss_module
from smollm2.model.loss import chunk_rows, linear_cross_entropy

VOCAB, PADDED, WIDTH = 300, 384, 16


def plain_cross_entropy(h, weight, targets):
    """The reference, in fp32: full logits, padded columns -inf, mean over targets != -100, and its gradients."""
    h2, w2 = h.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    logits = h2 @ w2.t()
    logits[:, VOCAB:] = float("-inf")
    loss = F.cross_entropy(logits, targets, ignore_index=-100)
    (0.5 * loss).backward()
    return loss, h2.grad, w2.grad


def inputs(rows: int, dtype: torch.dtype):
    torch.manual_seed(0)
    h = torch.randn(rows, WIDTH, dtype=dtype, requires_grad=True)
    weight = torch.randn(PADDED, WIDTH, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, VOCAB, (rows,))
    targets[[3, 11, rows - 2]] = -100
    return h, weight, targets


# (rows, rows per chunk): one chunk; even chunks; a ragged last chunk (40 = 16 + 16 + 8; 37 = 4 x 8 + 5)
CHUNKINGS = [(40, None), (40, 8), (40, 16), (37, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, per_chunk", CHUNKINGS)
def test_fused_chunked_loss_matches_plain_cross_entropy(monkeypatch, dtype, rows, per_chunk):
    if per_chunk:
        monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", per_chunk * PADDED)
        assert chunk_rows(rows, PADDED, torch.device("cpu")) == per_chunk
    h, weight, targets = inputs(rows, dtype)
    loss = linear_cross_entropy(h, weight, targets, VOCAB)
    (0.5 * loss).backward()
    expected, grad_h, grad_w = plain_cross_entropy(h, weight, targets)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss, expected, **tol)
    torch.testing.assert_close(h.grad.float(), grad_h, **tol)
    torch.testing.assert_close(weight.grad.float(), grad_w, **tol)
    assert torch.all(weight.grad[VOCAB:] == 0)  # padded rows: no probability mass, no gradient
    assert torch.all(h.grad[targets == -100] == 0)  # ignored targets contribute nothing
    with torch.no_grad():  # the no-grad path (eval) gives the same loss
        torch.testing.assert_close(linear_cross_entropy(h, weight, targets, VOCAB), loss.detach())


def test_chunk_rows_is_a_power_of_two_within_the_budget():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert chunk_rows(10**6, 50304, cpu) == 512 and 512 * 50304 <= loss_module.CHUNK_ELEMENTS
    assert chunk_rows(10**6, 50304, cuda) == 4096 and 4096 * 50304 <= loss_module.CHUNK_ELEMENTS_CUDA
    assert chunk_rows(100, 50304, cpu) == 100  # never more than the rows there are
    assert chunk_rows(10, 10**9, cpu) == 1  # at least one row


@pytest.mark.compile
def test_compiled_chunk_matches_plain_cross_entropy(monkeypatch):
    """`compiled=True` (the GPU default under train.compile) runs each chunk's softmax + gradient through torch.compile;
    with a ragged last chunk, each chunk shape compiles once."""
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 16 * PADDED)
    h, weight, targets = inputs(40, torch.float32)
    loss = linear_cross_entropy(h, weight, targets, VOCAB, compiled=True)
    (0.5 * loss).backward()
    expected, grad_h, grad_w = plain_cross_entropy(h, weight, targets)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, grad_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, grad_w, rtol=1e-5, atol=1e-6)
