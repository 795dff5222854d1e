"""Our model and Hugging Face `transformers`, both ways: which class computes what our model computes, its config, and one
table of parameter names that the export (export.py) and the import (hf_import.py) both read.

Two classes represent our model with no custom code:

    GPTNeoXForCausalLM   norm=layernorm, mlp=gelu, bias=true (the spec's model): sequential residuals, rotary over the
                         whole head dim, tanh GELU, biases everywhere; the fused QKV rows regrouped per head
    LlamaForCausalLM     norm=rmsnorm, mlp=swiglu, bias=false (SmolLM2-135M): q, k, v and gate, up are our fused
                         rows cut apart, in order; any n_kv_head

Both tied or untied. Everything else (RMSNorm with GELU, LayerNorm with SwiGLU, biases on a Llama, GQA on a GPT-NeoX) has
no class that computes it without custom code, and is refused naming the field. Both use rotate-half RoPE as ours does, so
no q/k row is permuted. HF tables hold the logical vocabulary; ours is padded to `pad_vocab_multiple` rows with zeros.
"""

from __future__ import annotations

import torch

from smollm2.config import Mlp, ModelConfig, Norm
from smollm2.errors import UserError

NEOX, LLAMA = "GPTNeoXForCausalLM", "LlamaForCausalLM"
# Per architecture: where a block's parameters live, the names outside the blocks, and the block's one-to-one names
# (ours -> theirs). The fused ones (qkv; SwiGLU's fc) are cut apart by `to_hf` and put back together by `from_hf`.
LAYERS = {NEOX: "gpt_neox.layers.{}.", LLAMA: "model.layers.{}."}
OUTSIDE = {
    NEOX: {"embed.weight": "gpt_neox.embed_in.weight", "norm.weight": "gpt_neox.final_layer_norm.weight",
           "norm.bias": "gpt_neox.final_layer_norm.bias", "head.weight": "embed_out.weight"},
    LLAMA: {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "head.weight": "lm_head.weight"},
}
BLOCK = {
    NEOX: {"norm1.weight": "input_layernorm.weight", "norm1.bias": "input_layernorm.bias",
           "norm2.weight": "post_attention_layernorm.weight", "norm2.bias": "post_attention_layernorm.bias",
           "attn.proj.weight": "attention.dense.weight", "attn.proj.bias": "attention.dense.bias",
           "mlp.fc.weight": "mlp.dense_h_to_4h.weight", "mlp.fc.bias": "mlp.dense_h_to_4h.bias",
           "mlp.proj.weight": "mlp.dense_4h_to_h.weight", "mlp.proj.bias": "mlp.dense_4h_to_h.bias"},
    LLAMA: {"norm1.weight": "input_layernorm.weight", "norm2.weight": "post_attention_layernorm.weight",
            "attn.proj.weight": "self_attn.o_proj.weight", "mlp.proj.weight": "mlp.down_proj.weight"},
}
LLAMA_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
LLAMA_FC = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
NEOX_QKV = "attention.query_key_value"
# The tables hold the names in the files. transformers 5 holds GPT-NeoX's untied head as `lm_head` in memory and writes
# it as `embed_out` (4.x: `embed_out` in both).
IN_MEMORY = {"embed_out.weight": "lm_head.weight"}
# tanh GELU: "gelu_pytorch_tanh" is the very F.gelu(approximate="tanh") call our MLP makes; "gelu_new" is the same
# function in Python ops (1e-7 apart), accepted on import.
NEOX_ACTS = ("gelu_pytorch_tanh", "gelu_new")


class HFMappingError(UserError):
    pass


def architecture(cfg: ModelConfig) -> str:
    """The `transformers` class that computes this model, or an error naming the field no class can represent."""
    if cfg.norm == Norm.layernorm and cfg.mlp == Mlp.gelu:
        if not cfg.bias:
            raise HFMappingError("model.bias=false with norm=layernorm, mlp=gelu: GPT-NeoX (the transformers class for "
                                 "this architecture) has biases on every layer; no class without custom code fits")
        if cfg.kv_heads != cfg.n_head:
            raise HFMappingError(f"model.n_kv_head={cfg.n_kv_head} with norm=layernorm, mlp=gelu: GPT-NeoX (the "
                                 "transformers class for this architecture) has no grouped-query attention")
        return NEOX
    if cfg.norm == Norm.rmsnorm and cfg.mlp == Mlp.swiglu:
        if cfg.bias:
            raise HFMappingError("model.bias=true with norm=rmsnorm, mlp=swiglu: exported as LlamaForCausalLM, which "
                                 "smollm2 writes without biases; train with model.bias=false")
        return LLAMA
    field = "model.mlp" if cfg.norm == Norm.rmsnorm else "model.norm"
    raise HFMappingError(f"{field}: norm={cfg.norm} with mlp={cfg.mlp} has no transformers class that runs it without "
                         "custom code (GPT-NeoX is layernorm + gelu, Llama rmsnorm + swiglu)")


def hf_config(cfg: ModelConfig, token_ids: dict[str, int], dtype: str = "fp32"):
    """The `transformers` config that computes what our model computes (every default that matters set explicitly);
    `token_ids`: its bos/eos/pad_token_id (the tokenizer's); one outside the vocabulary is left unset (GPT-2's ids for a
    model of another vocabulary whose checkpoint carries no tokenizer: transformers would refuse a pad id past it)."""
    import transformers

    arch = architecture(cfg)
    token_ids = {k: v if v is not None and 0 <= v < cfg.vocab_size else None for k, v in token_ids.items()}
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, intermediate_size=cfg.d_mlp, max_position_embeddings=cfg.max_seq_len,
                  tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0, **token_ids, use_cache=True,
                  dtype="bfloat16" if dtype == "bf16" else "float32", architectures=[arch])
    if arch == NEOX:
        return transformers.GPTNeoXConfig(
            hidden_act="gelu_pytorch_tanh", layer_norm_eps=cfg.norm_eps, use_parallel_residual=False,
            attention_bias=True, hidden_dropout=0.0, **common,
            rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta), "partial_rotary_factor": 1.0})
    return transformers.LlamaConfig(
        hidden_act="silu", rms_norm_eps=cfg.norm_eps, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
        attention_bias=False, mlp_bias=False, pretraining_tp=1, initializer_range=cfg.init_std, **common,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)})


def legacy_config_keys(cfg: ModelConfig) -> dict:
    """What transformers 4.x reads instead of `rope_parameters` (written into config.json beside it)."""
    if architecture(cfg) == NEOX:
        return {"rotary_pct": 1.0, "rotary_emb_base": float(cfg.rope_theta)}
    return {"rope_theta": float(cfg.rope_theta), "rope_scaling": None}


def file_names(state: dict, arch: str) -> dict:
    """A state dict (or shapes) keyed by the names in the files: the keys of an in-memory model (any version) renamed."""
    on_disk = {v: k for k, v in IN_MEMORY.items()} if arch == NEOX else {}
    return {on_disk.get(k, k): v for k, v in state.items()}


def memory_names(state: dict, names) -> dict:
    """`to_hf`'s state dict keyed as the in-memory model whose state dict keys are `names` holds them."""
    return {k if k in names else IN_MEMORY.get(k, k): v for k, v in state.items()}


def _blocks(cfg: ModelConfig, arch: str):
    """(ours, theirs) prefixes of every block."""
    return ((f"blocks.{i}.", LAYERS[arch].format(i)) for i in range(cfg.n_layer))


def to_hf(ours: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict in the names and layouts of `architecture(cfg)`: the vocabulary's storage padding cut off, the tied
    head stored once (as the input embedding)."""
    arch, V = architecture(cfg), cfg.vocab_size
    H, D, C = cfg.n_head, cfg.head_dim, cfg.d_model
    tables = {"embed.weight", "head.weight"}
    out = {theirs: ours[mine][:V] if mine in tables else ours[mine] for mine, theirs in OUTSIDE[arch].items()
           if mine in ours and not (mine == "head.weight" and cfg.tie_embeddings)}
    for o, n in _blocks(cfg, arch):
        out.update({n + theirs: ours[o + mine] for mine, theirs in BLOCK[arch].items()})
        qkv = ours[o + "attn.qkv.weight"]
        if arch == NEOX:  # ours: rows (3, H, D) = [q heads | k heads | v heads]; NeoX's (H, 3, D) = per head [q k v]
            out[n + NEOX_QKV + ".weight"] = qkv.view(3, H, D, C).transpose(0, 1).reshape(3 * C, C)
            out[n + NEOX_QKV + ".bias"] = ours[o + "attn.qkv.bias"].view(3, H, D).transpose(0, 1).reshape(3 * C)
        else:
            out.update(zip((n + name for name in LLAMA_QKV), qkv.split([H * D, cfg.kv_heads * D, cfg.kv_heads * D])))
            out.update(zip((n + name for name in LLAMA_FC), ours[o + "mlp.fc.weight"].chunk(2)))
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(theirs: dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int) -> dict[str, torch.Tensor]:
    """`to_hf` backwards: a state dict SmolLM(cfg) loads with strict=True (the tied head is the embedding, the padded
    rows are zeros). `theirs` must hold the names and shapes of `architecture(cfg)` (hf_import checks them first)."""
    arch = architecture(cfg)
    H, D, C = cfg.n_head, cfg.head_dim, cfg.d_model

    def table(rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows, rows.new_zeros(padded_vocab - rows.shape[0], rows.shape[1])])

    ours = {mine: table(theirs[name]) if mine in ("embed.weight", "head.weight") else theirs[name]
            for mine, name in OUTSIDE[arch].items() if mine != "head.weight" or not cfg.tie_embeddings}
    if cfg.tie_embeddings:
        ours["head.weight"] = ours["embed.weight"]
    for o, n in _blocks(cfg, arch):
        ours.update({o + mine: theirs[n + name] for mine, name in BLOCK[arch].items()})
        if arch == NEOX:  # per head [q k v] -> [q heads | k heads | v heads]
            ours[o + "attn.qkv.weight"] = theirs[n + NEOX_QKV + ".weight"].view(H, 3, D, C).transpose(0, 1).reshape(-1, C)
            ours[o + "attn.qkv.bias"] = theirs[n + NEOX_QKV + ".bias"].view(H, 3, D).transpose(0, 1).reshape(-1)
        else:
            ours[o + "attn.qkv.weight"] = torch.cat([theirs[n + name] for name in LLAMA_QKV])
            ours[o + "mlp.fc.weight"] = torch.cat([theirs[n + name] for name in LLAMA_FC])
    return {k: v.contiguous() for k, v in ours.items()}
