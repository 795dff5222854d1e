"""smollm2: pretrain a small GPT-2-style language model with RoPE on 1 to N GPUs (FSDP2 + DCP)."""

__version__ = "0.2.0"
