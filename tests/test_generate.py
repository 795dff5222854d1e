"""Batched, streamed generation: a batch decodes each row exactly as that prompt would alone (greedy and sampled, with and
without the KV cache), EOS freezes a row, the context caps prompts and new tokens with a warning, and the CLI reads prompt
files, draws several samples and streams one row's text as it is generated.

The model is configs/tiny.yaml's, randomly initialized with init_std 0.1: at the spec's 0.02 a random model's logits
follow the current token almost alone, so a wrong padding mask could still give the right greedy tokens (the control in
`test_batched_greedy_equals_one_by_one` shows that here it does not)."""

import dataclasses
import io
import re
import sys
import warnings
from pathlib import Path

import multirank  # tests/ helper
import pytest
import torch
from tiny import parts

from smollm2.checkpoint import Checkpointer
from smollm2.config import GenerateConfig, load_config
from smollm2.data.tokenizer import EOS_ID, PAD_ID, get_tokenizer
from smollm2.errors import UserError
from smollm2.model import SmolLM
from smollm2.serve.generate import TextStream, fit_to_context, generate, generate_batch, main

ROOT = Path(__file__).resolve().parents[1]
GREEDY = GenerateConfig(temperature=0.0, max_new_tokens=20, stop_at_eos=False)
SAMPLED = GenerateConfig(temperature=1.0, top_k=50, top_p=0.95, max_new_tokens=20, stop_at_eos=False, seed=11)


def tiny_model(config: str = "configs/tiny.yaml") -> SmolLM:
    cfg = dataclasses.replace(load_config(ROOT / config).model, init_std=0.1)
    model = SmolLM(cfg)
    model.init_weights(0)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> SmolLM:
    return tiny_model()


@pytest.fixture(scope="module", params=["tiny", "tiny_llama"])
def any_model(request) -> SmolLM:
    """The batching properties for both architectures (tiny_llama: grouped-query attention, its KV cache of 2 heads)."""
    return tiny_model(f"configs/{request.param}.yaml")


def random_prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50000, (n,), generator=g).tolist() for n in lengths]


PROMPTS = random_prompts(1, 5, 17)


def one_by_one(model, prompts, cfg, seeds=None) -> list[list[int]]:
    seeds = seeds if seeds is not None else [cfg.seed + row for row in range(len(prompts))]
    return [generate(model, prompt, dataclasses.replace(cfg, seed=seed)) for prompt, seed in zip(prompts, seeds)]


# ------------------------------------------------------------------------------------------------------ the model


def test_left_padded_rows_get_each_prompt_s_own_logits(any_model):
    pads = [16, 12, 0]
    ids = torch.tensor([[PAD_ID] * pad + prompt for pad, prompt in zip(pads, PROMPTS)])
    with torch.no_grad():
        batched = any_model(ids, left_pad=torch.tensor(pads))
        unmasked = any_model(ids)
        for row, (pad, prompt) in enumerate(zip(pads, PROMPTS)):
            alone = any_model(torch.tensor([prompt]))[0]
            torch.testing.assert_close(batched[row, pad:, :50257], alone[:, :50257], atol=1e-4, rtol=1e-4)
            assert torch.isfinite(batched[row, :, :50257]).all()  # padding queries too: no empty softmax row
            if pad:  # the padding matters: seen, it changes the logits
                assert (unmasked[row, -1, :50257] - alone[-1, :50257]).abs().max() > 0.1


# ------------------------------------------------------------------------------------------------ batch == alone


def test_batched_greedy_equals_one_by_one(any_model, monkeypatch):
    batched = generate_batch(any_model, PROMPTS, GREEDY)
    assert batched == one_by_one(any_model, PROMPTS, GREEDY)
    assert [len(out) for out in batched] == [20, 20, 20]
    # the control: the same batch with the padding visible (no mask, positions counted from the padding) decodes otherwise
    forward = any_model.forward
    monkeypatch.setattr(any_model, "forward", lambda idx, *args, left_pad=None, **kwargs: forward(idx, *args, **kwargs))
    assert generate_batch(any_model, PROMPTS, GREEDY) != batched


def test_batched_sampling_equals_one_by_one_with_the_same_seeds(any_model):
    batched = generate_batch(any_model, PROMPTS, SAMPLED)  # row r: seed 11 + r
    assert batched == one_by_one(any_model, PROMPTS, SAMPLED)
    assert len(set(map(tuple, batched))) == 3 and all(len(set(out)) > 5 for out in batched)  # real draws, not a constant
    # a row does not depend on the batch around it: other order, other company, explicit seeds
    assert generate_batch(any_model, PROMPTS[::-1], SAMPLED, seeds=[13, 12, 11]) == batched[::-1]
    extra = random_prompts(9, seed=1)[0]
    assert generate_batch(any_model, [extra, PROMPTS[2]], SAMPLED, seeds=[5, 13])[1] == batched[2]


def test_kv_cache_with_left_padded_rows_equals_full_recompute(any_model):
    for cfg in (GREEDY, SAMPLED):
        cached = generate_batch(any_model, PROMPTS, cfg, use_cache=True)
        assert cached == generate_batch(any_model, PROMPTS, cfg, use_cache=False)


def test_a_fixed_seed_reproduces(model):
    first = generate_batch(model, PROMPTS, SAMPLED)
    assert generate_batch(model, PROMPTS, SAMPLED) == first
    assert generate_batch(model, PROMPTS, dataclasses.replace(SAMPLED, seed=12)) != first
    assert generate_batch(model, PROMPTS[1:], dataclasses.replace(SAMPLED, seed=12)) == first[1:]  # row r: seed + r


def test_the_context_caps_each_row(model):
    cfg = dataclasses.replace(GREEDY, max_new_tokens=40)
    prompts = random_prompts(3, 100, 127, 130)  # context 128
    assert [len(out) for out in generate_batch(model, prompts, cfg)] == [40, 28, 1, 0]


# ----------------------------------------------------------------------------------------------------------- EOS


def eos_after(model, monkeypatch, trigger: int) -> list[int]:
    """Make EOS the certain next token after `trigger`: the model's own logits, EOS raised where the input is `trigger`.
    Returns a list that counts the forward calls."""
    forward, calls = model.forward, []

    def patched(idx, *args, **kwargs):
        calls.append(idx.shape)
        logits = forward(idx, *args, **kwargs)
        logits[..., EOS_ID] = torch.where(idx == trigger, 1e4, logits[..., EOS_ID])
        return logits

    monkeypatch.setattr(model, "forward", patched)
    return calls


def test_eos_stops_a_row_and_the_others_go_on(model, monkeypatch):
    free = generate_batch(model, PROMPTS, GREEDY)  # stop_at_eos off: nothing stops
    trigger = free[1][3]
    expected = [[] if prompt[-1] == trigger else out[: out.index(trigger) + 1] if trigger in out else out
                for prompt, out in zip(PROMPTS, free)]
    assert len(expected[1]) <= 4 and max(len(out) for out in expected) == 20
    calls = eos_after(model, monkeypatch, trigger)
    cfg = dataclasses.replace(GREEDY, stop_at_eos=True)
    streamed = []
    assert generate_batch(model, PROMPTS, cfg, on_token=lambda row, token: streamed.append((row, token))) == expected
    assert len(calls) == 20 and sorted(streamed) == sorted((row, t) for row, out in enumerate(expected) for t in out)
    assert one_by_one(model, PROMPTS, cfg) == expected


def test_decoding_stops_once_every_row_is_done(model, monkeypatch):
    calls = eos_after(model, monkeypatch, 464)
    prompts = [prompt[:-1] + [464] for prompt in PROMPTS]  # every row ends on the trigger: EOS comes first
    assert generate_batch(model, prompts, dataclasses.replace(GREEDY, stop_at_eos=True)) == [[], [], []]
    assert len(calls) == 1  # the prefill, then nothing


# ------------------------------------------------------------------------------------------------------ streaming


def test_on_token_hears_each_token_once_in_order_as_it_is_chosen(model, monkeypatch):
    forward, calls = model.forward, []
    monkeypatch.setattr(model, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    heard = []
    outs = generate_batch(model, PROMPTS, SAMPLED, on_token=lambda row, token: heard.append((len(calls), row, token)))
    for row, out in enumerate(outs):
        mine = [(step, token) for step, r, token in heard if r == row]
        assert [token for _, token in mine] == out
        assert [step for step, _ in mine] == list(range(1, 21))  # token k right after forward k, not at the end
    assert [row for _, row, _ in heard] == [0, 1, 2] * 20


def test_text_stream_prints_only_whole_characters():
    tok = get_tokenizer()
    text = "Hi 🌍! 世界, naïve 👩‍👩‍👧 — ok"
    ids = tok.encode(text)
    assert any(not _utf8_ok(tok.token_bytes(t)) for t in ids), "no character split over tokens: the test tests nothing"
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces) and "" in pieces  # waited for the rest of a character
    assert sum(bool(piece) for piece in pieces) > 5  # and printed as it went


def _utf8_ok(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --------------------------------------------------------------------------------------------------------- context


def test_fit_to_context_keeps_a_long_prompt_s_end_or_caps_the_new_tokens():
    ids = list(range(200))
    kept, warning = fit_to_context(ids, 24, 128)
    assert kept == list(range(73, 200)) and "prompt truncated to its last 127 tokens" in warning
    kept, warning = fit_to_context(ids[:128], 24, 128)
    assert kept == list(range(1, 128)) and "prompt truncated to its last 127 tokens" in warning
    kept, warning = fit_to_context(ids[:100], 50, 128)
    assert kept == ids[:100] and "new tokens capped to 28 (of 50)" in warning
    assert fit_to_context(ids[:100], 28, 128) == (ids[:100], None)


# ---------------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> Path:
    """`model` saved as a step-1 checkpoint with configs/tiny.yaml (its generate.max_new_tokens: 24)."""
    cfg = load_config(ROOT / "configs/tiny.yaml")
    cfg.model = model.cfg
    root = tmp_path_factory.mktemp("generate") / "run" / "checkpoints"
    with warnings.catch_warnings():  # DCP without a process group: "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        Checkpointer(root, 0, rank=0, world_size=1).save(1, parts(model, torch.optim.AdamW(model.parameters()), step=1), cfg)
    return root.parent


def expected(model, prompts: list[str], cfg: GenerateConfig, samples: int = 1) -> tuple[str, list[list[int]]]:
    """What the CLI should print, one prompt at a time through `generate` (row r: seed + r), and the new ids."""
    tok, text, news = get_tokenizer(), "", []
    for prompt in prompts:
        for _ in range(samples):
            news.append(generate(model, tok.encode(prompt), dataclasses.replace(cfg, seed=cfg.seed + len(news))))
            text += f"{prompt}{tok.decode(news[-1])}\n"
    return text, news


def test_cli_prompts_file_and_num_samples(model, checkpoint, tmp_path, capsys, monkeypatch):
    prompts = ["ROMEO:", "To be, or not to be", "  And yet "]
    (tmp_path / "prompts.txt").write_text(f"{prompts[0]}\n\n{prompts[1]}\n   \n{prompts[2]}\n")
    args = ["--checkpoint", str(checkpoint), "--max-new-tokens", "6", "--seed", "7", "--num-samples", "2"]
    cfg = GenerateConfig(max_new_tokens=6, seed=7)  # tiny.yaml: T 1.0, top-k 50, top-p 0.95
    want, news = expected(model, prompts, cfg, samples=2)
    assert main([*args, "--prompts-file", str(tmp_path / "prompts.txt")]) == 0
    out, err = capsys.readouterr()
    assert out == want and "rows 1-6 of 6" in err
    assert news[0] != news[1] and news[2] != news[3] and news[4] != news[5]  # one prompt's samples: seeds 7, 8; ...
    # the batch size changes nothing (rows 1-5 together, row 6 alone, streamed); stdin works as a file; --prompt first
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(prompts[1:])))
    assert main([*args, "--prompt", prompts[0], "--prompts-file", "-", "--batch-size", "5"]) == 0
    out, err = capsys.readouterr()
    assert out == want and "rows 1-5 of 6" in err and "row 6 of 6" in err


def test_cli_streams_a_single_row_as_it_is_generated(checkpoint, monkeypatch, model):
    forwards, writes = [], []
    forward = SmolLM.forward
    monkeypatch.setattr(SmolLM, "forward", lambda self, *a, **kw: forwards.append(1) or forward(self, *a, **kw))

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append((len(forwards), text))
            return super().write(text)

    recorder = Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    assert main(["--checkpoint", str(checkpoint), "--prompt", "ROMEO:", "--seed", "3", "--max-new-tokens", "12"]) == 0
    assert recorder.getvalue() == expected(model, ["ROMEO:"], GenerateConfig(max_new_tokens=12, seed=3))[0]
    assert writes[0] == (0, "ROMEO:")  # the prompt before the first forward
    assert len({step for step, text in writes if text}) > 5  # then text after each step, not all at the end
    writes.clear()
    assert main(["--checkpoint", str(checkpoint), "--prompt", "ROMEO:", "--seed", "3", "--no-stream"]) == 0
    assert len([text for _, text in writes if text.strip()]) == 1


def test_cli_caps_what_does_not_fit_with_a_warning(model, checkpoint, capsys):
    tok = get_tokenizer()
    long, medium, short = "word " * 200, "word " * 110, "word " * 50  # context 128, 24 new tokens (tiny.yaml)
    n = len(tok.encode(medium))
    assert len(tok.encode(long)) == 201 and n < 128 < n + 24 and len(tok.encode(short)) + 24 <= 128
    args = ["--checkpoint", str(checkpoint), "--prompt", long, "--prompt", medium, "--prompt", short, "--temperature", "0"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "warning: prompt 1 'word word word word word word word word '...: it is 201 tokens and the model's context " \
           "(model.max_seq_len) is 128: prompt truncated to its last 127 tokens, and 1 new token" in err
    assert f"warning: prompt 2 'word word word word word word word word '...: it is {n} tokens and the model's context " \
           f"(model.max_seq_len) is 128: new tokens capped to {128 - n} (of 24)" in err
    assert "prompt 3" not in err and err.count("warning:") == 2
    greedy = GenerateConfig(temperature=0.0, max_new_tokens=24)
    news = [generate(model, tok.encode(long)[-127:], greedy), generate(model, tok.encode(medium), greedy),
            generate(model, tok.encode(short), greedy)]
    assert [len(new) for new in news] == [1, 128 - n, 24]
    assert out == "".join(f"{prompt}{tok.decode(new)}\n" for prompt, new in zip((long, medium, short), news))


@pytest.mark.parametrize("args, message", [
    (["--prompts-file", "/nonexistent/prompts.txt"], "prompts file not found: /nonexistent/prompts.txt"),
    (["--num-samples", "0"], "--num-samples must be at least 1 (got 0)"),
    (["--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
])
def test_cli_bad_arguments(checkpoint, args, message):
    with pytest.raises(UserError, match=re.escape(message)):
        main(["--checkpoint", str(checkpoint), *args])


def test_cli_empty_prompts_file(checkpoint, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="no prompts in .*empty.txt: write one prompt per line"):
        main(["--checkpoint", str(checkpoint), "--prompts-file", str(tmp_path / "empty.txt")])


# ------------------------------------------------------------------------------------------------------ distributed


def _decode_on_rank(rank: int, seed: int) -> tuple[list[list[int]], list[int]]:
    model = tiny_model()
    cfg = dataclasses.replace(SAMPLED, seed=seed, max_new_tokens=8)
    return generate_batch(model, PROMPTS, cfg), generate(model, PROMPTS[1], cfg)


@pytest.mark.multirank
def test_under_torch_distributed_every_rank_gets_rank_0_s_tokens(model, tmp_path):
    """Each rank samples with another seed; the broadcast makes every rank's result rank 0's."""
    results = multirank.run_ranks(_decode_on_rank, [(11,), (99,)], tmp_path, timeout=120)
    assert all(status == "ok" for status, _ in results), results
    cfg = dataclasses.replace(SAMPLED, max_new_tokens=8)
    rank0 = (generate_batch(model, PROMPTS, cfg), generate(model, PROMPTS[1], cfg))
    assert results[0][1] == results[1][1] == rank0
    assert generate_batch(model, PROMPTS, dataclasses.replace(cfg, seed=99)) != rank0[0]  # rank 1 alone would differ
