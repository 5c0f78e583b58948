"""Small deterministic SFT / mid-training sets for the tiny default and the tests.

* ``tool_use``: the assistant answers with a call wrapped in ``<tool_call>...</tool_call>``,
  tokens the base vocabulary lacks - learning them needs the embedding and LM head
  (the BFCL ablation of the method, at toy scale).
* ``general``: copy / reverse / count instructions, mixed into every expert's SFT.
* ``midtrain``: plain text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOOL_CALL_TOKENS = ("<tool_call>", "</tool_call>")
CITIES = ("paris", "rome", "tokyo", "lima", "oslo", "cairo", "delhi", "quito")
WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "book", "fish")


def tool_use_record(rng: random.Random) -> dict:
    city = rng.choice(CITIES)
    call = json.dumps({"name": "get_weather", "arguments": {"city": city}})
    return {
        "domain": "tool_use",
        "messages": [
            {"role": "system", "content": "You can call the tool get_weather(city)."},
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": f"{TOOL_CALL_TOKENS[0]}{call}{TOOL_CALL_TOKENS[1]}"},
        ],
        "call": {"name": "get_weather", "arguments": {"city": city}},
    }


def general_record(rng: random.Random) -> dict:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
    task = rng.choice(("copy", "reverse", "count"))
    if task == "copy":
        prompt, answer = f"Copy: {' '.join(words)}", " ".join(words)
    elif task == "reverse":
        prompt, answer = f"Reverse: {' '.join(words)}", " ".join(reversed(words))
    else:
        prompt, answer = f"Count the words: {' '.join(words)}", str(len(words))
    return {"domain": "general", "messages": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}]}


def midtrain_record(rng: random.Random) -> dict:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return {"domain": "math", "text": f"{a} plus {b} is {a + b}. The sum of {a} and {b} is {a + b}."}


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def write_toy_sets(out_dir: str | Path, n: int = 64, seed: int = 0) -> dict[str, Path]:
    rng = random.Random(seed)
    out = Path(out_dir)
    return {
        "tool_use": write_jsonl(out / "tool_use.jsonl", [tool_use_record(rng) for _ in range(n)]),
        "general": write_jsonl(out / "general.jsonl", [general_record(rng) for _ in range(n)]),
        "midtrain": write_jsonl(out / "midtrain.jsonl", [midtrain_record(rng) for _ in range(n)]),
    }
