"""Document masking (smollm2/model/attention.py): a packed window of documents computes what each document computes
alone, by every kernel this machine can run; the GPU kernels (flash-attn varlen, compiled flex) against SDPA with the
mask where CUDA is (they skip without it)."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from smollm2.config import ModelConfig
from smollm2.data.loader import documents_of
from smollm2.errors import ConfigError
from smollm2.model import KVCache, SmolLM, attention_kernel
from smollm2.model import attention as attention_module
from smollm2.model.attention import document_mask, varlen_cu_seqlens

pytestmark = pytest.mark.unit

EOS = 50256
VOCAB = 50258
TINY = ModelConfig(n_layer=2, n_head=4, d_model=64, d_mlp=256, max_seq_len=64, document_masking=True)
# SmolLM2-135M's architecture at the same size: GQA (2 KV heads for 4), SwiGLU, RMSNorm, no biases, untied head
LLAMA = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_mlp=176, norm="rmsnorm", mlp="swiglu", bias=False,
                    tie_embeddings=False, max_seq_len=64, rope_theta=100000.0, document_masking=True)
ARCHS = pytest.mark.parametrize("arch", [TINY, LLAMA], ids=["gpt2", "llama"])
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_model(cfg=TINY, seed=0, **changes):
    model = SmolLM(ModelConfig(**{**cfg.__dict__, **changes}))
    model.init_weights(seed)
    return model


def packed_window(T=40, lengths=(11, 17), seed=0):
    """(x, y) [2, T]: row 0 packs documents of `lengths` (each ending in EOS) and a last one cut by the window's end;
    row 1 is one document. Returns x, y and row 0's documents as (start, end) spans."""
    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, 50000, (2, T + 1), generator=g)
    spans, start = [], 0
    for n in lengths:
        window[0, start + n - 1] = EOS
        spans.append((start, start + n))
        start += n
    spans.append((start, T))
    return window[:, :-1].contiguous(), window[:, 1:].contiguous(), spans


def document_ids(x: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loader's doc_ids and reset positions of rows x (tests/test_mixture.py checks its rule), as tensors on x's
    device; rows that are one document each: zeros and 0..T-1."""
    docs = documents_of(x.cpu().numpy(), eos, position_reset=True)
    if not docs:
        return torch.zeros_like(x), torch.arange(x.shape[1], device=x.device).expand_as(x)
    return docs["doc_ids"].to(x.device), docs["positions"].to(x.device)


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_grads_close(a, b, atol=1e-5):
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------- the helpers


def test_the_document_mask_and_flash_boundaries():
    x, _, spans = packed_window()
    doc_ids, _ = document_ids(x, EOS)
    mask = document_mask(doc_ids)
    assert mask.shape == (2, 1, 40, 40) and mask[0, 0, 12, 11] and not mask[0, 0, 11, 10] and not mask[0, 0, 11, 12]
    assert torch.equal(mask[1, 0], torch.ones(40, 40, dtype=torch.bool).tril())
    # documents of both rows as sequences of the 80 flattened tokens, padded with empty ones to a power of two
    assert varlen_cu_seqlens(doc_ids.int()).tolist() == [0, 11, 28, 40, 80]
    three = torch.tensor([[0, 0, 1, 2, 2], [0, 1, 1, 1, 1]])
    assert varlen_cu_seqlens(three).tolist() == [0, 2, 3, 5, 6, 10, 10, 10, 10]


# -------------------------------------------------------------------------------------------------- the equivalence


@ARCHS
def test_a_packed_window_computes_each_document_alone(arch):
    """fp32: each position's logits equal its document's run alone (positions from 0); the gradient of the summed loss
    equals the sum of the separate runs' gradients. Row 1 (one document) equals the unmasked run."""
    x, y, spans = packed_window()
    doc_ids, positions = document_ids(x, EOS)
    packed = make_model(arch)
    logits = packed(x, doc_ids=doc_ids, positions=positions)[..., :VOCAB]
    (packed(x, y, doc_ids=doc_ids, positions=positions) * y.numel()).backward()
    alone = make_model(arch)
    for start, end in spans:
        torch.testing.assert_close(logits[0, start:end], alone(x[:1, start:end])[0, :, :VOCAB], atol=1e-5, rtol=1e-5)
        (alone(x[:1, start:end], y[:1, start:end]) * (end - start)).backward()
    torch.testing.assert_close(logits[1], alone(x[1:])[0, :, :VOCAB], atol=1e-5, rtol=1e-5)
    (alone(x[1:], y[1:]) * y.shape[1]).backward()
    assert_grads_close(grads(packed), grads(alone))


def masked_run(arch, x, y, doc_ids, positions, **changes):
    model = make_model(arch, **changes)
    logits = model(x, doc_ids=doc_ids, positions=positions)[..., :VOCAB]
    model(x, y, doc_ids=doc_ids, positions=positions).backward()
    return logits, grads(model)


@ARCHS
def test_naive_and_activation_checkpointing_agree_with_sdpa_and_the_mask(arch):
    """The reference kernel, and the recompute path (Block.recompute re-runs the block with the same plan)."""
    x, y, _ = packed_window()
    doc_ids, positions = document_ids(x, EOS)
    ref_logits, ref_grads = masked_run(arch, x, y, doc_ids, positions, attention="sdpa")
    logits, naive_grads = masked_run(arch, x, y, doc_ids, positions, attention="naive")
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert_grads_close(naive_grads, ref_grads)
    recomputing = SmolLM(ModelConfig(**{**arch.__dict__, "attention": "sdpa"}),
                         recompute=partial(checkpoint, use_reentrant=False))
    recomputing.init_weights(0)
    recomputing(x, y, doc_ids=doc_ids.int(), positions=positions.int()).backward()  # the loader's int32 too
    assert_grads_close(grads(recomputing), ref_grads)


@ARCHS
def test_flex_runs_forward_on_cpu_and_agrees(arch):
    """torch 2.13's FlexAttention has no CPU backward (compiled or eager): on CPU `flex` evaluates (eager, without
    grad), with documents or causal alone, and refuses to train in one line."""
    x, _, _ = packed_window()
    doc_ids, positions = document_ids(x, EOS)
    sdpa, flex = make_model(arch, attention="sdpa"), make_model(arch, attention="flex")
    with torch.no_grad():
        torch.testing.assert_close(flex(x, doc_ids=doc_ids, positions=positions), sdpa(x, doc_ids=doc_ids,
                                   positions=positions), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(flex(x), sdpa(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="model.attention=flex cannot train on cpu"):
        flex(x, doc_ids=doc_ids)


def test_documents_without_position_reset_count_positions_across_the_window():
    x, _, _ = packed_window()
    doc_ids, reset = document_ids(x, EOS)
    model = make_model()
    with torch.no_grad():
        masked = model(x, doc_ids=doc_ids)
        assert torch.equal(masked, model(x, doc_ids=doc_ids, positions=torch.arange(40).expand(2, 40)))
        assert not torch.allclose(masked[0, 11:], model(x, doc_ids=doc_ids, positions=reset)[0, 11:])
        assert torch.equal(masked[1], model(x[1:])[0])  # one document, positions 0..T-1: the plain path's


# ---------------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("attention,device,dtype,message", [
    ("flash_attn", "cpu", torch.bfloat16, "model.attention=flash_attn runs on CUDA only"),
    ("flash_attn", "cuda", torch.bfloat16, "the flash-attn package is not importable"),
    ("flex", "cpu", torch.float32, "model.attention=flex cannot train on cpu"),
])
def test_bad_combinations_are_one_line_config_errors(attention, device, dtype, message, monkeypatch):
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", None)  # as here, also where it is installed
    cfg = ModelConfig(**{**TINY.__dict__, "attention": attention})
    with pytest.raises(ConfigError, match=message) as err:
        attention_kernel(cfg, device, dtype)
    assert "\n" not in str(err.value)


def test_flash_attn_in_fp32_is_refused(monkeypatch):
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", object())  # importable, say
    with pytest.raises(ConfigError, match="needs bf16 or fp16 activations"):
        attention_kernel(ModelConfig(**{**TINY.__dict__, "attention": "flash_attn"}), "cuda", torch.float32)


def test_kernel_names(monkeypatch):
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", None)
    named = lambda attention, device="cpu", dtype=torch.float32, masking=True, **kw: attention_kernel(  # noqa: E731
        ModelConfig(**{**TINY.__dict__, "attention": attention, "document_masking": masking}), device, dtype, **kw)
    assert (named("auto"), named("sdpa"), named("naive")) == ("sdpa + mask", "sdpa + mask", "naive + mask")
    assert named("flex", training=False) == "flex"
    assert (named("auto", masking=False), named("naive", masking=False)) == ("sdpa", "naive")
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", object())
    assert named("auto", "cuda", torch.bfloat16) == "flash_attn varlen" and named("auto") == "sdpa + mask"


def test_generation_takes_no_documents():
    model = make_model()
    x, _, _ = packed_window()
    doc_ids, _ = document_ids(x, EOS)
    with pytest.raises(ValueError, match="generation"):
        model(x, doc_ids=doc_ids, kv_cache=KVCache(model.cfg, 2, 40))
    with pytest.raises(ValueError, match="doc_ids has shape"):
        model(x, doc_ids=doc_ids[:, :5])


def test_the_cost_bench_cuts_log_normal_documents_into_windows():
    """bench/doc_masking.py's windows: documents of mean ~600 tokens, so most windows of 2048 hold several."""
    from bench.doc_masking import document_windows, window_stats

    windows = document_windows(16, 2048, 1024, 600.0, 1.0, seed=0)
    assert windows.shape == (16, 2049) and torch.equal(windows, document_windows(16, 2048, 1024, 600.0, 1.0, seed=0))
    eos = (windows == 1023).sum().item()
    assert 16 * 2049 / 800 < eos < 16 * 2049 / 450  # mean length ~600
    stats = window_stats(windows, 1023)
    assert stats["windows_with_several_docs"] > 0.8 and stats["docs_per_window_mean"] > 3


# --------------------------------------------------------------------------------------------------------- on CUDA


def cuda_window(T=384, seed=0):
    """Documents crossing the 128-token blocks of flex and flash-attn: lengths 100, 150, 60 and a cut one; row 1 one."""
    x, y, _ = packed_window(T, (100, 150, 60), seed)
    return x.cuda(), y.cuda()


def gpu_run(arch, x, y, attention, masked=True):
    model = make_model(ModelConfig(**{**arch.__dict__, "max_seq_len": x.shape[1]}), attention=attention).cuda()
    model = model.to(torch.bfloat16)
    docs = dict(zip(("doc_ids", "positions"), document_ids(x, EOS))) if masked else {}
    logits = model(x, **docs)[..., :VOCAB].float()
    model(x, y, **docs).backward()
    return logits, {name: p.grad.float() for name, p in model.named_parameters()}


def assert_bf16_close(ours, ref):
    """One bf16 kernel against another: the error's norm against the reference's own, and the same direction."""
    logits, grad = ours
    ref_logits, ref_grad = ref
    assert (logits - ref_logits).norm() / ref_logits.norm() < 2e-2
    for name in ref_grad:
        a, b = grad[name].flatten(), ref_grad[name].flatten()
        if b.norm() > 0:
            assert (a - b).norm() / b.norm() < 5e-2, name
            assert F.cosine_similarity(a, b, dim=0) > 0.998, name


@pytest.mark.gpu
@cuda
@pytest.mark.skipif(attention_module.flash_attn_varlen_func is None, reason="needs flash-attn")
@ARCHS
def test_flash_attn_varlen_matches_sdpa_and_the_mask_on_cuda(arch):
    x, y = cuda_window()
    cfg = ModelConfig(**{**arch.__dict__, "attention": "flash_attn"})
    assert attention_kernel(cfg, "cuda", torch.bfloat16) == "flash_attn varlen"
    assert_bf16_close(gpu_run(arch, x, y, "flash_attn"), gpu_run(arch, x, y, "sdpa"))


@pytest.mark.gpu
@cuda
@ARCHS
def test_flex_matches_sdpa_and_the_mask_on_cuda(arch):
    x, y = cuda_window()
    assert attention_kernel(ModelConfig(**{**arch.__dict__, "attention": "flex"}), "cuda", torch.bfloat16) == "flex"
    assert_bf16_close(gpu_run(arch, x, y, "flex"), gpu_run(arch, x, y, "sdpa"))
    assert_bf16_close(gpu_run(arch, x, y, "flex", masked=False), gpu_run(arch, x, y, "sdpa", masked=False))


@pytest.mark.gpu
@cuda
def test_masked_kernels_differ_from_the_unmasked_run_on_cuda():
    """The comparisons above would pass if every kernel ignored the documents alike: the mask must change the result."""
    x, y = cuda_window()
    masked, plain = gpu_run(TINY, x, y, "auto"), gpu_run(TINY, x, y, "auto", masked=False)
    assert (masked[0][0, 120:] - plain[0][0, 120:]).norm() / plain[0][0, 120:].norm() > 0.1
    torch.testing.assert_close(masked[0][1], plain[0][1], atol=0.05, rtol=0.05)  # row 1 is one document



# ------------------------------------------------------------------------------------------------------- validation


def test_validation_masks_the_val_windows_as_training_does(tmp_path):
    """With masking, the val loss is the masked model's loss on the val windows (the loader's documents), not the
    unmasked one: a run is evaluated as it is trained."""
    import torch.distributed as dist

    from smollm2.data import Dataset, ValWindows
    from smollm2.data.shards import write_shard
    from smollm2.distributed import DistEnv
    from smollm2.observe.validation import validation_loss

    tokens = torch.randint(0, 50000, (65,), generator=torch.Generator().manual_seed(0))
    tokens[[9, 20, 41, 50]] = EOS  # documents in both val windows (tokens 0..32, 32..64)
    for split in ("train", "val"):
        write_shard(tmp_path / f"d_{split}_000000.bin", tokens.numpy())
    val = ValWindows(Dataset.open(tmp_path), 32, 2)
    x, y = val.windows[:, :-1], val.windows[:, 1:]
    model, env = make_model(), DistEnv(0, 1, 0, torch.device("cpu"))
    doc_ids, positions = document_ids(x, EOS)
    with torch.no_grad():
        masked, plain = model(x, y, doc_ids=doc_ids, positions=positions).item(), model(x, y).item()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert validation_loss(model, {"": val}, None, 2, env, (EOS, True))["val_loss"] == pytest.approx(masked, abs=1e-6)
        assert validation_loss(model, {"": val}, None, 2, env)["val_loss"] == pytest.approx(plain, abs=1e-6)
    finally:
        dist.destroy_process_group()
    assert abs(masked - plain) > 1e-3
