"""SmolLM2 in a Gradio page: a prompt, the sampling controls, and the continuation streamed token by token.

This file stands alone (gradio, transformers, torch and the standard library only): `python -m smollm2.export --format
space` copies it into a Hugging Face Space as `app.py`, next to the exported model in `model/`, and `python -m
smollm2.app` serves it locally.

    python app.py [--model model/] [--host 127.0.0.1] [--port 7860] [--share]

The host and port default to GRADIO_SERVER_NAME / GRADIO_SERVER_PORT when set (a Space sets them to 0.0.0.0 / 7860),
else 127.0.0.1 / 7860: this machine only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

HERE = Path(__file__).resolve().parent
INFO_FILE = "smollm2_export.json"  # written by the export: step, tokens seen, parameters, val loss
DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 0.95, "max_new_tokens": 100, "seed": 0}
EXAMPLES = ["ROMEO:", "To be, or not to be", "KING HENRY:", "Once upon a time"]
MAX_PROMPT_CHARS = 100_000  # far beyond any context; only stops a pasted book from being tokenized at all
MAX_TEMPERATURE = 10.0


class _Stop(StoppingCriteria):
    """Ends a generation whose page went away (gradio closed the stream), so the next request starts at once."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _number(value, name: str, low: float, high: float, whole: bool = False) -> float:
    """VALUE as a finite float in [low, high] (a whole number if asked); ValueError with a sentence for the page."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number (got {value!r}).") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number (got {value!r}).")
    if not low <= number <= high:
        bounds = f"at least {low:g}" if high == math.inf else f"between {low:g} and {high:.10g}"
        raise ValueError(f"{name} must be {bounds} (got {value!r}).")
    if whole and number != int(number):
        raise ValueError(f"{name} must be a whole number (got {value!r}).")
    return number


class Generator:
    """The model, its tokenizer, what the page says about them, and the one function the page calls."""

    def __init__(self, model_dir: str | Path, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir)).to(self.device).eval()
        self.context = int(self.model.config.max_position_embeddings)
        info_file = Path(model_dir) / INFO_FILE
        self.info = json.loads(info_file.read_text()) if info_file.is_file() else {}  # a Hub repo id: the model only
        self.info.setdefault("n_params", sum(p.numel() for p in self.model.parameters()))

    def describe(self) -> str:
        """One Markdown line: step, parameters, val loss, context, tokens seen, device (what is known)."""
        info, val = self.info, self.info.get("val_loss")
        parts = [f"step **{info['step']:,}**" if info.get("step") is not None else None,
                 f"**{info['n_params']:,}** parameters",
                 f"val loss **{val:.4f}**" if val is not None else "val loss **n/a**",
                 f"context **{self.context:,}** tokens",
                 f"**{info['tokens_seen']:,}** tokens seen" if info.get("tokens_seen") is not None else None,
                 f"running on **{self.device}**"]
        return " · ".join(p for p in parts if p)

    def check(self, prompt, temperature, top_k, top_p, max_new_tokens, seed) -> tuple[dict, list[str]]:
        """The settings to generate with (prompt tokens included) and notes on what was cut to fit the context.

        Raises ValueError with a sentence for the page when an input is unusable: the sliders clamp in the page, but the
        API (gradio_client, curl) passes anything."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("Type a prompt first.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"The prompt is {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,}.")
        settings = {"temperature": _number(temperature, "Temperature", 0, MAX_TEMPERATURE),
                    "top_k": int(_number(top_k, "Top-k", 0, len(self.tok), whole=True)),
                    "top_p": _number(top_p, "Top-p", 0, 1),
                    "max_new_tokens": int(_number(max_new_tokens, "Max new tokens", 1, math.inf, whole=True)),
                    "seed": int(_number(seed, "Seed", 0, 2**32 - 1, whole=True))}
        if settings["top_p"] == 0:
            raise ValueError("Top-p must be above 0 (1 = off).")
        notes, ids, shown = [], self.tok(prompt, verbose=False)["input_ids"], prompt
        if len(ids) >= self.context:  # keep the end: that is what the continuation follows
            keep = self.context - 1
            notes.append(f"The prompt is {len(ids):,} tokens, the context {self.context:,}: kept its last {keep:,} tokens.")
            ids = ids[-keep:]
            shown = self.tok.decode(ids)
        room = self.context - len(ids)
        if settings["max_new_tokens"] > room:
            notes.append(f"Max new tokens capped at {room:,}: prompt + continuation must fit the "
                         f"{self.context:,}-token context.")
            settings["max_new_tokens"] = room
        settings.update(input_ids=ids, shown_prompt=shown)
        return settings, notes

    def stream(self, prompt, temperature, top_k, top_p, max_new_tokens, seed) -> Iterator[tuple[str, str]]:
        """Yields (prompt + continuation so far, message) as the tokens arrive; bad inputs give ("", a warning)."""
        try:
            settings, notes = self.check(prompt, temperature, top_k, top_p, max_new_tokens, seed)
        except ValueError as err:
            yield "", f"⚠️ {err}"
            return
        ids = torch.tensor([settings["input_ids"]], device=self.device)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
        stop = _Stop()
        greedy = settings["temperature"] == 0
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": settings["max_new_tokens"],
                  "do_sample": not greedy, "streamer": streamer, "stopping_criteria": StoppingCriteriaList([stop]),
                  "pad_token_id": self.tok.pad_token_id, "eos_token_id": self.tok.eos_token_id}
        if self.tok.pad_token_id not in (None, self.tok.eos_token_id):  # a tokenizer without a pad token pads with EOS
            kwargs["suppress_tokens"] = [self.tok.pad_token_id]  # never sampled in training either
        if greedy:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        else:
            kwargs.update(temperature=settings["temperature"], top_k=settings["top_k"], top_p=settings["top_p"])
        result: dict = {}

        def run() -> None:
            try:
                torch.manual_seed(settings["seed"])  # one request at a time (see build_demo): the seed fixes the text
                with torch.no_grad():
                    result["sequences"] = self.model.generate(**kwargs)
            except BaseException as err:  # noqa: BLE001 - shown in the page
                result["error"] = err
                streamer.end()

        start = time.perf_counter()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        message, text = " ".join(notes), ""
        try:
            for piece in streamer:
                text += piece
                yield settings["shown_prompt"] + text, f"{message} Generating…".strip()
        finally:  # also when gradio closes this generator early: stop the model before the next request
            stop.event.set()
            thread.join(timeout=60)
        if "sequences" not in result:
            err = result.get("error", TimeoutError("the model did not stop"))
            yield settings["shown_prompt"] + text, f"⚠️ Generation failed: {type(err).__name__}: {err}"
            return
        new = result["sequences"].shape[1] - ids.shape[1]
        took = time.perf_counter() - start
        rate = new / max(took, 1e-9)
        done = f"Done: {new:,} new token{'' if new == 1 else 's'} in {took:.1f} s ({rate:.0f} tokens/s, seed {settings['seed']})."
        yield settings["shown_prompt"] + text, f"{message} {done}".strip()


def build_demo(model_dir: str | Path = HERE / "model", device: str | None = None) -> gr.Blocks:
    """The page for the model in MODEL_DIR (an exported folder, or a Hub repo id when online), queued for streaming."""
    gen = Generator(model_dir, device)
    with gr.Blocks(title="SmolLM2") as demo:
        gr.Markdown("# SmolLM2\nA small GPT-2-style language model with rotary position embeddings, pretrained from "
                    f"scratch.\n\n{gen.describe()}", elem_id="info")
        prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Type a prompt, e.g. ROMEO:  (Shift+Enter generates)",
                            elem_id="prompt")
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=DEFAULTS["temperature"], step=0.05, label="Temperature (0 = greedy)")
            top_k = gr.Slider(0, 200, value=DEFAULTS["top_k"], step=1, label="Top-k (0 = off)")
            top_p = gr.Slider(0.05, 1.0, value=DEFAULTS["top_p"], step=0.01, label="Top-p (1 = off)")
        with gr.Row():
            max_new = gr.Slider(1, gen.context, value=min(DEFAULTS["max_new_tokens"], gen.context), step=1,
                                label=f"Max new tokens (prompt + new ≤ {gen.context:,})")
            seed = gr.Number(value=DEFAULTS["seed"], precision=0, label="Seed (same seed + settings = same text)")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        output = gr.Textbox(label="Prompt + continuation", lines=10, elem_id="output")
        message = gr.Markdown(elem_id="message")
        gr.Examples(EXAMPLES, inputs=prompt, label="Example prompts")
        # one event for the button and Enter, one request at a time: the seed is torch's global RNG state
        gr.on([button.click, prompt.submit], gen.stream, inputs=[prompt, temperature, top_k, top_p, max_new, seed],
              outputs=[output, message], api_name="generate", concurrency_limit=1)
    return demo.queue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(HERE / "model"), help="an exported folder, or a Hub repo id (online)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="0.0.0.0 serves the network (default: $GRADIO_SERVER_NAME, else this machine only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also a public gradio.live link (needs network)")
    args = parser.parse_args(argv)
    try:
        demo = build_demo(args.model)
    except OSError as err:  # no such folder / repo, no network for a repo id
        sys.exit(f"error: cannot load the model from {args.model}: {str(err).splitlines()[0]}")
    print(f"serving {args.model} at http://{args.host}:{args.port}/", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
