"""The transformer (model.py), its rotary position embeddings (rotary.py), its fused LM-head loss (loss.py) and its
document-masked attention (attention.py). It knows
nothing of sharding, recompute or compile: smollm2/parallelize.py decides those."""

from smollm2.model.attention import attention_kernel
from smollm2.model.model import KVCache, SmolLM, padded_vocab_size, parameter_table

__all__ = ["KVCache", "SmolLM", "attention_kernel", "padded_vocab_size", "parameter_table"]
