"""``evaluate``: a model's score on each domain suite, plus "general" and "overall"."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from megatron_bar.data.chat import ChatTemplate, Message
from megatron_bar.eval.generate import greedy_generate
from megatron_bar.eval.scorers import get_scorer
from megatron_bar.eval.suites import TestPrompt, load_suites
from megatron_bar.rl.sandbox import SandboxUnavailable

# Scores are pure functions of (scorer, record, completion): the code sandbox and
# math-verify are the slow part of an evaluation and many models give the same replies.
_SCORE_CACHE: dict[tuple[str, str, str], float] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_MAX = 200_000


def _score(prompt: TestPrompt, completion: str) -> float:
    key = (prompt.scorer, json.dumps(prompt.record, sort_keys=True), completion)
    with _CACHE_LOCK:
        if key in _SCORE_CACHE:
            return _SCORE_CACHE[key]
    try:
        value = float(get_scorer(prompt.scorer)(prompt.record, completion))
    except SandboxUnavailable:  # the machine cannot run code: an error, not a wrong reply
        raise
    except Exception:  # noqa: BLE001 - a reply the scorer cannot read is a wrong reply
        value = 0.0
    value = min(max(value, 0.0), 1.0) if value == value else 0.0  # NaN -> 0
    with _CACHE_LOCK:
        if len(_SCORE_CACHE) < _CACHE_MAX:
            _SCORE_CACHE[key] = value
    return value


def load_score_cache(folder: str | Path) -> int:
    """Add the verdicts saved by :func:`save_score_cache` under ``folder`` to this
    process's cache; returns how many. Scorers are pure, so a verdict is reused only for
    the same scorer, record and reply."""
    n = 0
    for path in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else ():
        for scorer, record, completion, value in json.loads(path.read_text()):
            with _CACHE_LOCK:
                _SCORE_CACHE[(scorer, record, completion)] = value
            n += 1
    return n


def save_score_cache(path: str | Path) -> None:
    """Write this process's verdicts to ``path`` (atomically: a reader never sees half a file)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _CACHE_LOCK:
        entries = [[*key, value] for key, value in _SCORE_CACHE.items()]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)


@dataclass
class EvalResult:
    scores: dict[str, float]  # domain -> [0, 100], plus "general" and "overall"
    samples: dict[str, list[dict]] = field(default_factory=dict)  # domain -> prompt/reply/score


def _as_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, Path)):
        from megatron_bar.data.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def evaluate_detailed(
    model,
    tokenizer,
    suites: Mapping[str, Sequence[TestPrompt]] | str | Path,
    *,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    general_domain: str = "general",
) -> EvalResult:
    """:func:`evaluate`, also returning every prompt's reply and score."""
    tokenizer = _as_tokenizer(tokenizer)
    if isinstance(suites, (str, Path)):
        suites = load_suites(suites)
    template = ChatTemplate(tokenizer)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    flat = [(d, p) for d, ps in suites.items() for p in ps]
    encoded = [template.encode_prompt([Message(r, c) for r, c in p.messages]) for _, p in flat]
    outs = greedy_generate(model, encoded, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                           max_new_tokens=max_new_tokens, batch_size=batch_size)
    if was_training and hasattr(model, "train"):
        model.train()
    per_domain: dict[str, list[float]] = {d: [] for d in suites}
    samples: dict[str, list[dict]] = {d: [] for d in suites}
    for (domain, prompt), ids in zip(flat, outs):
        reply = tokenizer.decode(ids, skip_special_tokens=False)
        s = _score(prompt, reply)
        per_domain[domain].append(s)
        samples[domain].append({"prompt": prompt.messages[-1][1], "reply": reply, "score": s})
    scores = {d: 100.0 * sum(v) / len(v) for d, v in per_domain.items() if v}
    if general_domain in scores:
        scores["general"] = scores[general_domain]
    scores["overall"] = sum(scores[d] for d in per_domain if d in scores) / max(len(per_domain), 1)
    return EvalResult(scores, samples)


def evaluate(
    model,
    tokenizer,
    suites: Mapping[str, Sequence[TestPrompt]] | str | Path,
    *,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    general_domain: str = "general",
) -> dict[str, float]:
    """Score ``model`` on held-out suites by greedy decoding. Stable interface.

    Args:
        model: ``input_ids [b, s] -> logits [b, s, V]``. A ``megatron_bar.load_model``
            module (:class:`~megatron_bar.model.load.CausalLM`) and a Hugging Face causal
            LM (``AutoModelForCausalLM``; its ``.logits`` are read) are batched with left
            padding; any other callable is batched by equal prompt length.
        tokenizer: a :class:`megatron_bar.data.tokenizer.Tokenizer` or a path that
            :func:`~megatron_bar.data.tokenizer.load_tokenizer` reads (a checkpoint's
            ``tokenizer/`` folder, an HF export folder). Prompts are rendered with the
            chat template (:meth:`ChatTemplate.encode_prompt`) and replies decoded with
            special tokens kept (tool calls are special tokens), up to EOS.
        suites: ``{domain: [TestPrompt]}`` from :func:`load_suites`, or its folder.
        max_new_tokens: reply length limit.
        batch_size: prompts decoded together.
        general_domain: which suite also reports as ``"general"``.

    Returns:
        ``{domain: score}`` for each suite, in [0, 100] (the mean of the prompts'
        scores times 100), plus ``"general"`` (the ``general_domain`` suite, when
        present) and ``"overall"`` (the unweighted mean over the suites). Greedy
        decoding and pure scorers: the same model gives the same numbers.
    """
    return evaluate_detailed(model, tokenizer, suites, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, general_domain=general_domain).scores
