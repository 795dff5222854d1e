import math

import pytest
import torch

from smollm2.config import ModelConfig, load_config
from smollm2.model import SmolLM, parameter_table
from smollm2.model.model import naive_attention
from smollm2.model.rotary import apply_rope, rope_cos_sin

TINY = ModelConfig(n_layer=2, n_head=4, d_model=64, d_mlp=256, max_seq_len=64)
# The same size in SmolLM2-135M's architecture: GQA (2 KV heads for 4), SwiGLU, RMSNorm, no biases; untied here, so that
# both head layouts are covered (configs/tiny_llama.yaml ties them, as SmolLM2 does)
LLAMA = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_mlp=176, norm="rmsnorm", mlp="swiglu", bias=False,
                    tie_embeddings=False, max_seq_len=64, rope_theta=100000.0)
ARCHS = pytest.mark.parametrize("arch", [TINY, LLAMA], ids=["gpt2", "llama"])


def make_model(cfg=TINY, seed=0, **changes):
    cfg = ModelConfig(**{**cfg.__dict__, **changes})
    model = SmolLM(cfg)
    model.init_weights(seed)
    return model


def test_parameter_counts_match_the_spec(root):
    cfg = load_config(root / "configs/smollm2_135.yaml").model
    table = dict(parameter_table(cfg))
    assert table["token embeddings (tied with LM head)"] == 38_598_144
    assert table["per layer"] == 7_087_872
    assert table["  attention QKV (weight + bias)"] == 1_771_776
    assert table["  attention out-proj (weight + bias)"] == 590_592
    assert table["  MLP up (weight + bias)"] == 2_362_368
    assert table["  MLP down (weight + bias)"] == 2_360_064
    assert table["  norms (2 x LayerNorm)"] == 3_072
    assert table["final norm"] == 1_536
    assert table["total"] == 123_654_144
    assert table["total as stored (vocab padded to 50304)"] == 123_654_144 + 46 * 768


def test_the_smollm2_135m_preset_has_the_released_shape(root):
    cfg = load_config(root / "configs/smollm2_135m_llama.yaml").model
    table = dict(parameter_table(cfg))
    assert table["total"] == table["total as stored (vocab padded to 49152)"] == 134_515_008
    assert table["token embeddings (tied with LM head)"] == 49_152 * 576
    assert table["  attention QKV (weight, 3 KV heads)"] == 576 * (9 + 2 * 3) * 64
    assert table["  MLP gate + up (weight)"] == 2 * 576 * 1536 and table["  norms (2 x RMSNorm)"] == 2 * 576
    tiny = load_config(root / "configs/tiny_llama.yaml").model
    assert (tiny.kv_heads, tiny.norm, tiny.mlp, tiny.bias) == (2, "rmsnorm", "swiglu", False)


def test_llama_style_init_and_an_untied_padded_head():
    model = make_model(LLAMA)
    assert model.head.weight is not model.embed.weight and model.head.weight.shape == model.embed.weight.shape
    assert torch.all(model.head.weight[50258:] == 0) and torch.all(model.embed.weight[50258:] == 0)
    assert abs(model.head.weight[:50258].std().item() - 0.02) < 0.001
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert isinstance(model.norm, torch.nn.RMSNorm) and torch.all(model.norm.weight == 1)
    assert model.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert model.num_params(logical=True) == sum(p.numel() for p in model.parameters()) - 2 * 46 * 64
    assert model.flops_params() == model.num_params() - 50258 * 64  # the untied table is a lookup


def test_parameter_table_cli(capsys):
    from smollm2.model.__main__ import main

    assert main(["--config", "configs/smollm2_135.yaml"]) == 0
    out = capsys.readouterr().out
    assert "123,654,144" in out and "38,598,144" in out and "7,087,872" in out and "123,689,472" in out


def test_head_is_tied_and_padded():
    model = make_model()
    assert model.head.weight is model.embed.weight
    assert model.embed.weight.shape[0] == 50304
    assert torch.all(model.embed.weight[50258:] == 0)


def test_init_is_gpt2_style():
    model = make_model(ModelConfig(n_layer=4, n_head=4, d_model=128, d_mlp=512, max_seq_len=64))
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert torch.all(model.blocks[1].attn.qkv.bias == 0)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)


@ARCHS
def test_meta_device_build_then_init_equals_eager_init(arch):
    with torch.device("meta"):
        meta = SmolLM(arch)
    meta.materialize("cpu")
    meta.init_weights(3)
    eager = make_model(arch, seed=3)
    for (name, a), (_, b) in zip(meta.state_dict().items(), eager.state_dict().items()):
        assert torch.equal(a, b), name
    assert (meta.head.weight is meta.embed.weight) == arch.tie_embeddings


def test_rope_tables_are_buffers_that_match_computing_them():
    """The forward slices fp32 cos/sin tables (not saved, refilled after the meta device) instead of computing them each
    call: the same values, bitwise, at any start position; past the tables or in another dtype it computes them."""
    with torch.device("meta"):
        meta = SmolLM(TINY)
    meta.materialize("cpu")
    head_dim = TINY.d_model // TINY.n_head
    cos, sin = rope_cos_sin(torch.arange(TINY.max_seq_len), head_dim, TINY.rope_theta)
    assert torch.equal(meta.rope_cos, cos) and torch.equal(meta.rope_sin, sin)
    assert not any(name.startswith("rope_") for name in meta.state_dict())
    model = make_model()
    idx = torch.randint(0, 50258, (2, 6))
    for start in (0, 5):
        sliced = model(idx, start_pos=start)
        model.rope_cos = model.rope_cos[:0]  # empty tables: the forward computes them
        computed = model(idx, start_pos=start)
        model._fill_rope_tables()
        assert torch.equal(sliced, computed), start


def test_padded_logits_are_minus_inf():
    model = make_model()
    logits = model(torch.randint(0, 50258, (2, 10)))
    assert logits.shape == (2, 10, 50304)
    assert torch.isneginf(logits[..., 50258:]).all()
    assert torch.isfinite(logits[..., :50258]).all()


def test_loss_is_finite_and_gives_padding_no_gradient():
    model = make_model()
    idx = torch.randint(0, 50258, (2, 16))
    loss = model(idx[:, :-1], idx[:, 1:])
    assert torch.isfinite(loss) and abs(loss.item() - math.log(50258)) < 0.5
    loss.backward()
    assert torch.all(model.embed.weight.grad[50258:] == 0)


@ARCHS
@pytest.mark.parametrize("attention", ["sdpa", "naive"])
def test_causality(attention, arch):
    model = make_model(arch, attention=attention).eval()
    idx = torch.randint(0, 50000, (1, 24))
    changed = idx.clone()
    t = 13
    changed[0, t] = (idx[0, t] + 1) % 50000
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t], b[:, t])


def test_rope_scores_depend_only_on_relative_offset():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    scores = []
    for shift in (0, 5, 1000):
        cos, sin = rope_cos_sin(torch.arange(shift, shift + 8), 16, 10000.0)
        scores.append(apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2))
    torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores[0], scores[2], atol=1e-3, rtol=1e-3)
    # and they do depend on the offset: RoPE is not a no-op
    plain = q @ k.transpose(-1, -2)
    assert not torch.allclose(scores[0], plain, atol=1e-2)


def test_blocks_get_fp32_rope_tables_when_the_weights_are_bf16():
    """The tables are computed in fp32 and reach every block as such (bf16 would round the angles); the residual stream
    runs in the weights' dtype."""
    from smollm2.model.model import Attention

    model = make_model().to(torch.bfloat16).eval()
    seen = []
    for module in model.modules():
        if isinstance(module, Attention):
            module.register_forward_pre_hook(lambda mod, args: seen.append(tuple(a.dtype for a in args[:3])))
    with torch.no_grad():
        model(torch.randint(0, 50000, (1, 8)))
    assert seen == [(torch.bfloat16, torch.float32, torch.float32)] * TINY.n_layer


def test_rope_rotate_half_convention():
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0  # pairs are (0, 2) and (1, 3)
    cos, sin = rope_cos_sin(torch.tensor([1]), 4, 10000.0)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([math.cos(1.0), 0.0, math.sin(1.0), 0.0]))


def test_sdpa_matches_naive_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 16) for _ in range(3))
    ref = naive_attention(q, k, v, 0)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for arch in (TINY, LLAMA):  # GQA: SDPA shares each KV head itself, the reference repeats it
        sdpa_model, naive_model = make_model(arch, attention="sdpa"), make_model(arch, attention="naive")
        idx = torch.randint(0, 50000, (2, 20))
        with torch.no_grad():
            a, b = sdpa_model(idx), naive_model(idx)
        torch.testing.assert_close(a[..., :50258], b[..., :50258], atol=1e-4, rtol=1e-4)


@ARCHS
def test_kv_cache_prefill_and_decode_match_full_forward(arch):
    from smollm2.model.model import KVCache

    model = make_model(arch).eval()
    idx = torch.randint(0, 50000, (1, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.cfg, 1, 20)
        part = [model(idx[:, :12], kv_cache=cache, start_pos=0)]
        part.append(model(idx[:, 12:15], kv_cache=cache, start_pos=12))  # multi-token chunk after a prefix
        for t in range(15, 20):
            part.append(model(idx[:, t : t + 1], kv_cache=cache, start_pos=t))
    torch.testing.assert_close(torch.cat(part, 1)[..., :50258], full[..., :50258], atol=1e-4, rtol=1e-4)
