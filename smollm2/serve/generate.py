"""Sampling: temperature, top-k, top-p (nucleus), max new tokens, EOS stop, a seed; batched, KV-cached, streamed.

    python -m smollm2.generate --checkpoint runs/x/checkpoints/latest --prompt "To be, or not to be"
    python -m smollm2.generate --checkpoint runs/x/checkpoints/latest --prompts-file prompts.txt --num-samples 4

Spec defaults: temperature 1.0, top-k 50, top-p 0.95, 100 new tokens, stop at EOS. Temperature 0 is greedy.

Prompts of different lengths decode together, left-padded: the padding is masked out and each row counts its positions
from its own first token, and each row samples from its own generator (row r: seed + r). So a row gets the tokens it
would get decoded alone with that seed, whatever the batch around it.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from smollm2.config import GenerateConfig
from smollm2.data.tokenizer import EOS_ID, PAD_ID, VOCAB_SIZE, Tokenizer
from smollm2.errors import UserError
from smollm2.model import KVCache, SmolLM

DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class SpecialIds:
    """The ids decoding treats apart, from the tokenizer (default: GPT-2's). EOS stops a row; pad fills the left of
    shorter prompts and is never sampled, unless it is EOS (a tokenizer without a pad token pads with EOS); no id from
    vocab_size up is sampled (the model's table may be larger than the tokenizer's vocab, and is padded for storage)."""

    eos_id: int = EOS_ID
    pad_id: int = PAD_ID
    vocab_size: int = VOCAB_SIZE

    @classmethod
    def of(cls, tok) -> SpecialIds:
        return cls(tok.eos_id, tok.pad_id, tok.vocab_size)


GPT2_IDS = SpecialIds()


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


def sample_next(logits: torch.Tensor, cfg: GenerateConfig, generator: torch.Generator | None = None,
                special: SpecialIds = GPT2_IDS) -> torch.Tensor:
    """logits [B, V] -> next ids [B]. Pad and ids past the tokenizer's vocab (storage padding) are never returned."""
    logits = logits.float().clone()
    logits[..., special.vocab_size :] = float("-inf")
    if special.pad_id != special.eos_id:
        logits[..., special.pad_id : special.pad_id + 1] = float("-inf")  # a slice: nothing on a narrower (test) row
    if cfg.temperature <= 1e-6:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sample_rows(logits: torch.Tensor, cfg: GenerateConfig, generators: list[torch.Generator],
                 active: list[bool], special: SpecialIds = GPT2_IDS) -> torch.Tensor:
    """Next id per row [B], pad for a finished row. Each active row draws from its own generator, with the [1, V] call a
    prompt decoded alone makes, so its draws do not depend on the other rows (nor on how many there are)."""
    if cfg.temperature <= 1e-6:  # greedy: no draws, one batched argmax
        tokens = sample_next(logits, cfg, special=special)
    else:
        tokens = torch.full((len(generators),), special.pad_id, dtype=torch.long)
        for row, generator in enumerate(generators):
            if active[row]:
                tokens[row] = sample_next(logits[row : row + 1], cfg, generator, special)[0]
    return tokens.masked_fill(~torch.tensor(active), special.pad_id)


@torch.no_grad()
def generate_batch(
    model: SmolLM,
    prompts: Sequence[Sequence[int]],
    cfg: GenerateConfig,
    *,
    device: torch.device | str = "cpu",
    use_cache: bool = True,
    on_token: Callable[[int, int], None] | None = None,
    seeds: Sequence[int] | None = None,
    special: SpecialIds = GPT2_IDS,
) -> list[list[int]]:
    """Each prompt's new token ids (EOS excluded): at most cfg.max_new_tokens and at most what fits in the context
    (model.max_seq_len) after that prompt; a prompt that fills the context gets none (main() keeps its end instead: see
    `fit_to_context`). An empty prompt starts from EOS.

    All rows decode together (see the module docstring), each as it would alone: row r samples from a generator seeded
    seeds[r] (default cfg.seed + r). A row that meets EOS (cfg.stop_at_eos) or its budget is done: its output is frozen
    while it rides along as padding; decoding stops when every row is done. `on_token(row, id)` hears each new id as soon
    as it is chosen, in order (streaming). `special`: the tokenizer's EOS, pad and vocab (default GPT-2's).

    Under torch.distributed every rank must call this with the same prompts (FSDP forwards are collective); rank 0's ids
    are broadcast, so all ranks decode the same sequences."""
    rows = [list(prompt) or [special.eos_id] for prompt in prompts]
    if not rows:
        return []
    seeds = [cfg.seed + row for row in range(len(rows))] if seeds is None else list(seeds)
    if len(seeds) != len(rows):
        raise ValueError(f"{len(seeds)} seeds for {len(rows)} prompts")
    budgets = [max(0, min(cfg.max_new_tokens, model.cfg.max_seq_len - len(row))) for row in rows]
    width = max(len(row) for row in rows)
    pads = [width - len(row) for row in rows]
    ids = torch.tensor([[special.pad_id] * pad + row for pad, row in zip(pads, rows)], dtype=torch.long, device=device)
    left_pad = torch.tensor(pads, device=device) if any(pads) else None  # None: no mask, as for one prompt alone
    cache = KVCache(model.cfg, len(rows), width + max(budgets)) if use_cache else None
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    new: list[list[int]] = [[] for _ in rows]
    active = [budget > 0 for budget in budgets]
    was_training = model.training
    model.eval()
    try:
        pos, step_input = 0, ids
        while any(active):
            if cache is not None:
                logits = model(step_input, kv_cache=cache, start_pos=pos, left_pad=left_pad)[:, -1]
                pos += step_input.shape[1]
            else:
                logits = model(ids, left_pad=left_pad)[:, -1]
            tokens = _sample_rows(logits.cpu(), cfg, generators, active, special).to(device)
            if distributed:
                dist.broadcast(tokens, src=0)
            for row, token in enumerate(tokens.tolist()):
                if not active[row]:
                    continue
                if cfg.stop_at_eos and token == special.eos_id:
                    active[row] = False
                    continue
                new[row].append(token)
                if on_token is not None:
                    on_token(row, token)
                active[row] = len(new[row]) < budgets[row]
            step_input = tokens.view(-1, 1)
            if cache is None:
                ids = torch.cat([ids, step_input], dim=1)
    finally:
        model.train(was_training)
    return new


@torch.no_grad()
def generate(
    model: SmolLM,
    prompt_ids: list[int],
    cfg: GenerateConfig,
    *,
    device: torch.device | str = "cpu",
    use_cache: bool = True,
    special: SpecialIds = GPT2_IDS,
) -> list[int]:
    """One prompt's new token ids, sampled with cfg.seed: `generate_batch` with one row (its rules on the context, EOS
    and torch.distributed apply)."""
    return generate_batch(model, [prompt_ids], cfg, device=device, use_cache=use_cache, special=special)[0]


def fit_to_context(ids: list[int], max_new_tokens: int, context: int) -> tuple[list[int], str | None]:
    """(the prompt ids to decode from, a warning saying what was cut or None) so that the prompt and at least one new token
    fit in the context (model.max_seq_len). A prompt that fills the context keeps its last context - 1 tokens (the end is
    what the continuation follows); otherwise the prompt stays whole and the new tokens are capped to what fits."""
    limit = f"the model's context (model.max_seq_len) is {context:,}"
    if len(ids) >= context:
        keep = context - 1
        return ids[len(ids) - keep :], (f"it is {len(ids):,} tokens and {limit}: prompt truncated to its last {keep:,} "
                                        "tokens, and 1 new token")
    if len(ids) + max_new_tokens > context:
        return ids, (f"it is {len(ids):,} tokens and {limit}: new tokens capped to {context - len(ids):,} "
                     f"(of {max_new_tokens:,})")
    return ids, None


class TextStream:
    """Token ids in, printable text out as soon as it is complete: the tokens' bytes go through an incremental UTF-8
    decoder, so a character split over tokens (emoji, CJK) comes out once, whole, never as replacement characters. All
    the pieces together equal `Tokenizer.decode` of all the ids."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text that `token` completes ('' while a character is still unfinished)."""
        return self._utf8.decode(self.tok.token_bytes(token))

    def echo(self, row: int, token: int) -> None:
        """An `on_token` for a one-row batch: print the text `token` completes now."""
        print(self.push(token), end="", flush=True)

    def flush(self) -> str:
        """What is left at the end (an unfinished character becomes a replacement character, as in `decode`)."""
        return self._utf8.decode(b"", final=True)


def read_prompts(path: str) -> list[str]:
    """One prompt per line of the file (`-`: stdin); blank lines are skipped, other lines are kept as they are."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read the prompts file {path}: {err}") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"no prompts in {'stdin' if path == '-' else path}: write one prompt per line")
    return prompts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smollm2.generate", description=__doc__.splitlines()[0],
        epilog="Output: each prompt followed by its continuation on stdout; settings, timings and warnings on stderr. "
               "A batch of one row streams its text as it is generated; a batch of several rows prints each text when "
               "the batch is done (--batch-size 1 streams every row). A prompt too long for the context keeps its last "
               "max_seq_len - 1 tokens; otherwise the new tokens are capped to what fits (a warning says which).")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint directory, a run directory or its checkpoints/latest, or a folder written by "
                             "python -m smollm2.export --format safetensors")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--prompts-file", metavar="FILE",
                        help="one prompt per line, blank lines skipped ('-': stdin); after any --prompt. Without either: "
                             "the config's sample.prompts")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N",
                        help="samples per prompt (default 1); row r (sample i of prompt j is row j*N + i) uses seed + r")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="B",
                        help=f"rows decoded together (default {DEFAULT_BATCH_SIZE}); the texts do not depend on it")
    parser.add_argument("--no-stream", action="store_true", help="do not stream: print every text when its batch is done")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", default="auto")
    return parser


def _device(name: str) -> torch.device:
    """--device: auto (cuda if torch sees one, else cpu), cpu, cuda or cuda:N; one line for anything else."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}, but torch sees no CUDA device: use --device cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: generate runs on cpu or cuda")
    return device


def _shown(text: str) -> str:
    return repr(text[:40]) + ("..." if len(text) > 40 else "")


def write_samples(model, prompts: list[str], settings: GenerateConfig, device, step: int,
                  log: Callable[[str, dict], None], tok) -> None:
    """The trainer's samples: one per prompt (prompt i with seed + i: samples differ, and repeat across evals), in the
    dataset's tokenizer `tok`, each handed to `log("sample", ...)`. Decoding feeds the blocks one new token at a time
    against a growing KV cache: every shape is new, so compiled blocks would recompile per token. Sampling is a small
    cost; it runs eagerly."""
    with torch.compiler.set_stance("force_eager"):
        for i, prompt in enumerate(prompts):
            ids = generate(model, tok.encode(prompt), replace(settings, seed=settings.seed + i), device=device,
                           special=SpecialIds.of(tok))
            log("sample", {"step": step, "prompt": prompt, "text": tok.decode(ids), "tokens": len(ids)})


def main(argv: list[str] | None = None) -> int:
    from smollm2.config import validate
    from smollm2.serve.loading import load_model_for_inference, load_tokenizer_for_inference

    args = _parser().parse_args(argv)
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    texts = args.prompt + (read_prompts(args.prompts_file) if args.prompts_file else [])  # a bad file fails before loading
    device = _device(args.device)
    model, cfg, step = load_model_for_inference(args.checkpoint, device)
    gen = cfg.generate
    for name in ("temperature", "top_k", "top_p", "max_new_tokens", "seed"):
        if getattr(args, name) is not None:
            setattr(gen, name, getattr(args, name))
    validate(cfg)
    tok = load_tokenizer_for_inference(args.checkpoint)  # the checkpoint's (GPT-2's if it carries none)
    rows: list[tuple[str, list[int]]] = []  # (prompt text, the ids decoded from), num_samples per prompt
    for j, text in enumerate(texts or cfg.sample.prompts):
        ids, warning = fit_to_context(tok.encode(text), gen.max_new_tokens, model.cfg.max_seq_len)
        if warning:
            print(f"warning: prompt {j + 1} {_shown(text)}: {warning}", file=sys.stderr)
        rows += [(text, ids)] * args.num_samples
    print(f"# step {step}, T={gen.temperature} top-k={gen.top_k} top-p={gen.top_p} max {gen.max_new_tokens} tokens, "
          f"seed {gen.seed}", file=sys.stderr)
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start : start + args.batch_size]
        stream = TextStream(tok) if len(batch) == 1 and not args.no_stream else None
        if stream is not None:
            print(batch[0][0], end="", flush=True)
        began = time.perf_counter()
        outs = generate_batch(model, [ids for _, ids in batch], gen, device=device, on_token=stream.echo if stream else None,
                              seeds=[gen.seed + start + row for row in range(len(batch))], special=SpecialIds.of(tok))
        took = time.perf_counter() - began
        if stream is not None:
            print(stream.flush(), flush=True)
        else:
            for (text, _), out in zip(batch, outs):
                print(f"{text}{tok.decode(out)}", flush=True)
        count = sum(len(out) for out in outs)
        where = "" if len(rows) == 1 else f" (row {start + 1} of {len(rows)})" if len(batch) == 1 else \
            f" (rows {start + 1}-{start + len(batch)} of {len(rows)})"
        print(f"# {count} tokens in {took:.2f}s{where}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)
