"""Passkey retrieval on the embedded SmolLM2: can the model still find one sentence thousands of tokens back?

Issue 7 asks the approximation to keep long-range retrieval, which sink + window schemes
lose. This check plants a passkey sentence at a chosen depth of a long filler text and asks
for it at the end:

    <intro> <filler ...> The pass key is 68142. Remember it. 68142 is the pass key. <filler ...>
    What is the pass key? The pass key is _

- Filler: the source of a standard-library module (:mod:`hyperattn.eval.text`); the
  needle goes on its own line, at the line break nearest to ``depth`` of the filler.
- Plain completion, no chat template. On the tuning text (``argparse``) at 2k and 8k
  tokens the exact model answered the digits with a per-digit log-probability near 0 in
  this form; wrapped in the chat template it put more weight on a wrong first token and
  retrieved less (see docs/QUALITY.md).
- The prompt ends with the answer's leading space (``_`` above, its own token in this
  tokenizer), so the next token must be the first digit: without it the exact model often
  put more weight on " a" than on " " + digit, which measures phrasing, not retrieval.
- Scoring follows how a served model runs: one prefill of the prompt (the method under
  test on every layer), then steps over the KV cache, which run exact SDPA
  (``HyperPolicy.min_query_len``):

  * ``logprob``: teacher-forced log-probability of the passkey's tokens (the tokenizer
    writes digits one token each) given the prompt; 0 is certain, ``5 * log(1/10) = -11.5``
    is a guess;
  * ``retrieved``: greedy decoding of ``max_new_tokens`` tokens whose first run of digits
    equals the passkey.
"""

from __future__ import annotations

import inspect
import random
import re
import time
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["INTRO", "QUESTION", "PasskeyPrompt", "make_passkey", "build_prompt", "score_prompt", "evaluate_passkey",
           "format_passkey_table"]

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    """A prompt with a planted passkey.

    ``input_ids (1, N)`` int64; ``answer_ids``: the passkey's tokens, one per digit;
    ``needle_start``/``needle_end``: token span of the passkey sentence in ``input_ids``.
    """

    input_ids: Tensor
    answer_ids: list[int]
    passkey: str
    depth: float
    needle_start: int
    needle_end: int

    @property
    def distance(self) -> int:
        """Tokens from the passkey sentence's last token to the last prompt token."""
        return self.input_ids.shape[1] - self.needle_end


def make_passkey(seed: int, index: int) -> str:
    """The ``index``-th 5-digit passkey (no leading zero) of ``seed``."""
    return str(random.Random(seed * 1_000_003 + index).randint(10000, 99999))


def build_prompt(tokenizer, text: str, num_tokens: int, depth: float, passkey: str) -> PasskeyPrompt:
    """``num_tokens`` tokens: intro, the source of ``text`` with the passkey sentence at ``depth``, question.

    ``depth`` in ``[0, 1]`` is the needle's position as a fraction of the filler; it goes at
    the nearest line break of the filler. ValueError if the source is too short or the
    arguments are out of range.

    Examples::

        >>> prompt = build_prompt(tokenizer, "argparse", 2048, 0.5, "68142")  # doctest: +SKIP
        >>> prompt.input_ids.shape, tokenizer.decode(prompt.answer_ids)  # doctest: +SKIP
        (torch.Size([1, 2048]), '68142')
    """
    from .text import stdlib_text

    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: expected a float in [0, 1], got {depth}")
    if not (passkey.isdigit() and passkey):
        raise ValueError(f"passkey: expected a string of digits, got {passkey!r}")
    head = tokenizer(INTRO).input_ids
    tail = tokenizer(QUESTION).input_ids + tokenizer(" ").input_ids
    needle = tokenizer(NEEDLE.format(key=passkey)).input_ids
    filler = tokenizer(stdlib_text(text)).input_ids
    room = num_tokens - len(head) - len(tail) - len(needle)
    if room < 1:
        raise ValueError(f"--tokens: expected more than {num_tokens - room} tokens for the intro, passkey and "
                         f"question, got {num_tokens}")
    if len(filler) < room:
        raise ValueError(f"--tokens: the source of {text!r} has only {len(filler)} tokens, asked for {room} of filler")
    filler = filler[:room]
    target = round(depth * room)
    # Before the nearest token that starts a new line (this tokenizer merges a newline with the
    # next line's indentation): the needle, which begins and ends with a newline, then sits on
    # its own line and splits no token.
    breaks = [i for i, t in enumerate(filler) if tokenizer.decode([t]).startswith("\n")] or [target]
    cut = min(breaks, key=lambda i: (abs(i - target), i))
    ids = head + filler[:cut] + needle + filler[cut:] + tail
    start = len(head) + cut
    return PasskeyPrompt(input_ids=torch.tensor([ids], dtype=torch.long),
                         answer_ids=tokenizer(passkey).input_ids, passkey=passkey, depth=depth,
                         needle_start=start, needle_end=start + len(needle))


@torch.no_grad()
def score_prompt(model, tokenizer, prompt: PasskeyPrompt, max_new_tokens: int = 8) -> dict:
    """Prefill ``prompt`` once, then score the answer over the KV cache (see the module docstring).

    The attention of the prefill is whatever ``model`` is set to (``hf.enable`` or SDPA).

    Returns:
        ``{"logprob", "first_digit_logprob", "generated", "retrieved"}``: the passkey tokens'
        summed teacher-forced log-probability, that of the first digit alone, the greedy
        continuation and whether it starts with the passkey followed by a non-digit (or the
        end of the generated tokens).
    """
    # transformers 5.x renamed the forward's ``past_key_values`` to ``cache``; accept both.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    device = next(model.parameters()).device
    out = model(prompt.input_ids.to(device), use_cache=True, logits_to_keep=1)
    cache, first_logits = out.past_key_values, out.logits[0, -1].float()

    answer = torch.tensor([prompt.answer_ids], device=device)
    forced = model(answer[:, :-1], use_cache=True, **{cache_arg: cache}).logits[0].float()
    logprobs = torch.log_softmax(torch.cat([first_logits[None], forced]), -1)
    token_lp = logprobs[torch.arange(answer.shape[1], device=device), answer[0]]
    # A negative count removes that many tokens in every transformers version since 4.36.
    cache.crop(-(answer.shape[1] - 1))

    generated = [int(first_logits.argmax())]
    for _ in range(max_new_tokens - 1):
        step = model(torch.tensor([[generated[-1]]], device=device), use_cache=True, **{cache_arg: cache}).logits[0, -1]
        generated.append(int(step.argmax()))
    text = tokenizer.decode(generated)
    digits = re.match(r"\d+", text)
    return {"logprob": float(token_lp.sum()), "first_digit_logprob": float(token_lp[0]), "generated": text,
            "retrieved": bool(digits and digits.group() == prompt.passkey)}


def evaluate_passkey(methods: list[str], *, text: str, tokens: int, depths: list[float], seed: int = 0,
                     max_new_tokens: int = 8, progress: bool = True, model=None, tokenizer=None,
                     configs: dict | None = None, prompts: list[PasskeyPrompt] | None = None,
                     device: torch.device | str = "cpu") -> dict:
    """Passkey retrieval per method and depth; the JSON-ready result.

    Args:
        methods: ``"exact"`` (transformers' SDPA) and method specs of ``hyperattn eval``
            (``NAME`` or ``NAME:field=value,...``), each run on every layer through
            :mod:`hyperattn.integrations.hf`.
        text: standard-library module whose source is the filler.
        tokens: prompt length in tokens.
        depths: needle positions as fractions of the filler.
        seed: seed of the passkeys (one per depth, shared by the methods) and of the methods.
        max_new_tokens: greedy tokens generated. Default 8.
        progress: tqdm progress bar. Default True.
        model, tokenizer: an already loaded embedded model (default: load it).
        configs: ``{label: HyperAttentionConfig}`` used instead of parsing these labels.
        prompts: prompts built beforehand (e.g. on another machine, whose standard library
            differs); default: built here from ``text``, ``tokens``, ``depths`` and ``seed``.
        device: where the model loaded here runs (not used with ``model``). Default ``"cpu"``.

    Returns:
        ``{"device", "versions", "setup", "rows": [per (method, depth)]}``; each row has
        ``logprob``, ``first_digit_logprob``, ``retrieved``, ``generated``, ``distance``
        (tokens between the passkey sentence and the end of the prompt) and ``seconds``.

    Examples::

        >>> result = evaluate_passkey(["exact", "structured"], text="argparse", tokens=2048,
        ...                           depths=[0.5], progress=False)  # doctest: +SKIP
        >>> [(r["method"], r["retrieved"]) for r in result["rows"]]  # doctest: +SKIP
        [('exact', True), ('structured', True)]
    """
    from tqdm.auto import tqdm

    from ..integrations import hf
    from .cli import _config_dict, _device_name, _model_label, _versions, parse_method

    configs = dict(configs or {})
    for label in methods:
        if label != "exact" and label not in configs:
            configs[label] = parse_method(label, seed)[1]
    if model is None:
        from .model import load_embedded_model

        model, tokenizer = load_embedded_model()
        model = model.to(device)
    if prompts is None:
        prompts = [build_prompt(tokenizer, text, tokens, depth, make_passkey(seed, i))
                   for i, depth in enumerate(depths)]
    rows = []
    bar = tqdm(total=len(methods) * len(prompts), desc="passkey", disable=not progress)
    for label in methods:
        for prompt in prompts:
            started = time.time()
            if label != "exact":
                hf.enable(model, hf.HyperPolicy(config=configs[label]))
            try:
                scored = score_prompt(model, tokenizer, prompt, max_new_tokens)
            finally:
                if label != "exact":
                    hf.disable(model)
            rows.append({"method": label, "depth": prompt.depth, "passkey": prompt.passkey,
                         "needle_start": prompt.needle_start, "distance": prompt.distance, **scored,
                         "seconds": round(time.time() - started, 1)})
            bar.update(1)
    bar.close()
    return {
        "device": _device_name(next(model.parameters()).device),
        "versions": _versions(),
        "setup": {"model": _model_label(next(model.parameters()).device), "task": "passkey", "text": text,
                  "tokens": tokens, "depths": list(depths), "seed": seed, "max_new_tokens": max_new_tokens,
                  "prompt": {"intro": INTRO, "needle": NEEDLE, "question": QUESTION},
                  "methods": {label: ({"method": "exact (sdpa)"} if label == "exact" else _config_dict(configs[label]))
                              for label in methods}},
        "rows": rows,
    }


def format_passkey_table(result: dict) -> str:
    """Method x depth: ``yes``/``no`` retrieved and the digits' log-probability."""
    setup = result["setup"]
    depths = list(dict.fromkeys(r["depth"] for r in result["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    by_key = {(r["method"], r["depth"]): r for r in result["rows"]}
    width = max(16, *(len(m) + 2 for m in methods))
    lines = [f"passkey retrieval, {setup['text']}, {setup['tokens']} tokens: retrieved (greedy) / "
             "log-prob of the passkey digits (0 = certain, -11.5 = guess)",
             "method".ljust(width) + "".join(f"{'depth ' + format(d, 'g'):>18}" for d in depths)]
    for m in methods:
        cells = [f"{'yes' if by_key[(m, d)]['retrieved'] else 'no'} / {by_key[(m, d)]['logprob']:7.2f}"
                 for d in depths]
        lines.append(m.ljust(width) + "".join(f"{c:>18}" for c in cells))
    distances = ", ".join(f"{format(d, 'g')}: {by_key[(methods[0], d)]['distance']}" for d in depths)
    lines.append(f"tokens from the passkey sentence to the end of the prompt, by depth: {distances}")
    return "\n".join(lines)
