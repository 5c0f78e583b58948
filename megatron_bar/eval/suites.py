"""Held-out test suites: one JSONL file per domain, one test prompt per line.

Format of a line (``<dir>/<domain>.jsonl``)::

    {"messages": [{"role": "user", "content": "What is 3 + 4?"}],   # or "prompt": "..."
     "scorer": "math",                                             # see scorers.SCORERS
     "answer": "7"}                                                # + the scorer's fields

* ``messages`` is the conversation so far (it must not end with an assistant turn);
  ``prompt`` is a shortcut for one user turn.
* ``scorer`` names how the reply is scored: ``math``, ``code``, ``tool_use``, ``safety``
  (the RLVR rewards of :mod:`megatron_bar.rl.rewards`), ``exact``, or
  ``package.module:function``. The rest of the record is what that scorer reads
  (``answer``, ``tests``, ``call``, ``behavior``).
* ``domain`` is optional: the file stem is the domain.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path



def atomic_write_text(path: Path, text: str) -> Path:
    """Write to a temporary file next to ``path``, then rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


class SuiteError(ValueError):
    """A malformed suite file; the message names the file and line."""


@dataclass(frozen=True)
class TestPrompt:
    __test__ = False  # not a pytest class

    domain: str
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    scorer: str
    record: dict = field(default_factory=dict, hash=False, compare=False)


def parse_test_prompt(obj, domain: str, where: str) -> TestPrompt:
    if not isinstance(obj, dict):
        raise SuiteError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise SuiteError(f"{where}: 'messages' must be a non-empty list")
        try:
            messages = tuple((str(m["role"]), str(m["content"])) for m in msgs)
        except (KeyError, TypeError):
            raise SuiteError(f"{where}: each message needs 'role' and 'content'") from None
    elif isinstance(obj.get("prompt"), str):
        messages = (("user", obj["prompt"]),)
    else:
        raise SuiteError(f"{where}: a test prompt needs 'messages' or 'prompt'")
    if messages[-1][0] == "assistant":
        raise SuiteError(f"{where}: the conversation must not end with an assistant turn")
    scorer = obj.get("scorer")
    if not isinstance(scorer, str) or not scorer:
        raise SuiteError(f"{where}: missing 'scorer' (math, code, tool_use, safety, exact, module:fn)")
    from megatron_bar.eval.scorers import get_scorer

    try:
        get_scorer(scorer)
    except (ValueError, TypeError) as e:
        raise SuiteError(f"{where}: {e}") from None
    return TestPrompt(str(obj.get("domain", domain)), messages, scorer, obj)


def load_suites(directory: str | Path, domains: list[str] | None = None) -> dict[str, list[TestPrompt]]:
    """``{domain: [TestPrompt, ...]}`` from ``directory/*.jsonl`` (sorted by domain).

    ``domains`` keeps only those (each must exist). An empty or malformed file is a
    :class:`SuiteError` naming the file and line.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SuiteError(f"{directory}: suite folder not found")
    files = {p.stem: p for p in sorted(directory.glob("*.jsonl"))}
    if domains is not None:
        missing = [d for d in domains if d not in files]
        if missing:
            raise SuiteError(f"{directory}: no suite file for {missing} (have {sorted(files)})")
        files = {d: files[d] for d in domains}
    if not files:
        raise SuiteError(f"{directory}: no *.jsonl suite files")
    suites = {}
    for domain, path in files.items():
        prompts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SuiteError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            prompts.append(parse_test_prompt(obj, domain, f"{path}:{n}"))
        if not prompts:
            raise SuiteError(f"{path}: no test prompts")
        suites[domain] = prompts
    return suites


def write_suite(path: str | Path, records: list[dict]) -> Path:
    """Write test records as a suite file (atomically), checking each one first."""
    path = Path(path)
    for i, r in enumerate(records, start=1):
        parse_test_prompt(r, path.stem, f"{path}:{i}")
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path
