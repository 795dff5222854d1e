"""Sampling: temperature, top-k, top-p (nucleus), max new tokens, EOS stop, a seed; KV-cached decoding.

    python -m smollm2.generate --checkpoint runs/x/checkpoints/latest --prompt "To be, or not to be"

Spec defaults: temperature 1.0, top-k 50, top-p 0.95, 100 new tokens, stop at EOS. Temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
import torch.distributed as dist

from smollm2.config import GenerateConfig
from smollm2.errors import UserError
from smollm2.model import KVCache, SmolLM
from smollm2.tokenizer import EOS_ID, PAD_ID, get_tokenizer


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability reaches top_p."""
    logits = logits.clone()
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = mass_before >= top_p  # the set reached top_p before this token: drop it (the top one always stays)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def sample_next(logits: torch.Tensor, cfg: GenerateConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next ids [B]. Pad and storage-padding ids are never returned."""
    logits = logits.float().clone()
    logits[..., PAD_ID:] = float("-inf")
    if cfg.temperature <= 1e-6:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: SmolLM,
    prompt_ids: list[int],
    cfg: GenerateConfig,
    *,
    device: torch.device | str = "cpu",
    use_cache: bool = True,
) -> list[int]:
    """New token ids after the prompt (EOS excluded), at most cfg.max_new_tokens and at most what fits in the context
    (model.max_seq_len): a prompt that fills the context gets none (main() refuses such a prompt up front).

    Under torch.distributed every rank must call this (FSDP forwards are collective); rank 0's token is broadcast so all
    ranks decode the same sequence."""
    was_training = model.training
    model.eval()
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    ids = torch.tensor([prompt_ids or [EOS_ID]], dtype=torch.long, device=device)
    max_len = min(model.cfg.max_seq_len, ids.shape[1] + cfg.max_new_tokens)
    budget = max_len - ids.shape[1]
    cache = KVCache(model.cfg, 1, max_len) if use_cache else None
    new: list[int] = []
    pos, step_input = 0, ids
    for _ in range(max(budget, 0)):
        if cache is not None:
            logits = model(step_input, kv_cache=cache, start_pos=pos)[:, -1]
            pos += step_input.shape[1]
        else:
            logits = model(ids)[:, -1]
        token = sample_next(logits.cpu(), cfg, generator).to(device)
        if distributed:
            dist.broadcast(token, src=0)
        next_id = int(token.item())
        if cfg.stop_at_eos and next_id == EOS_ID:
            break
        new.append(next_id)
        step_input = token.view(1, 1)
        ids = torch.cat([ids, step_input], dim=1)
    model.train(was_training)
    return new


def main(argv: list[str] | None = None) -> int:
    from smollm2.checkpoint import load_model_for_inference

    parser = argparse.ArgumentParser(prog="python -m smollm2.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a run's checkpoints/latest")
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable); default: the config's prompts")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    model, cfg, step = load_model_for_inference(args.checkpoint, device)
    gen = cfg.generate
    for name in ("temperature", "top_k", "top_p", "max_new_tokens", "seed"):
        if getattr(args, name) is not None:
            setattr(gen, name, getattr(args, name))
    from smollm2.config import validate

    validate(cfg)
    tok = get_tokenizer()
    prompts = [(prompt, tok.encode(prompt)) for prompt in args.prompt or cfg.sample.prompts]
    context = model.cfg.max_seq_len
    # generate() would return nothing for such a prompt (no room left in the context), which looks like a model that
    # stopped at once; all are checked before any output, so there are no partial results either.
    for prompt, ids in prompts:
        if len(ids) >= context:
            shown = repr(prompt[:40]) + ("..." if len(prompt) > 40 else "")
            raise UserError(f"the prompt {shown} is {len(ids):,} tokens; the model's context (model.max_seq_len) is "
                            f"{context:,}: shorten it to under {context:,} tokens")
    print(f"# step {step}, T={gen.temperature} top-k={gen.top_k} top-p={gen.top_p} max {gen.max_new_tokens} tokens",
          file=sys.stderr)
    for i, (prompt, ids) in enumerate(prompts):
        start = time.perf_counter()
        out = generate(model, ids, dataclasses.replace(gen, seed=gen.seed + i), device=device)
        took = time.perf_counter() - start
        print(f"{prompt}{tok.decode(out)}")
        print(f"# {len(out)} tokens in {took:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
