"""The demo's synthetic domains: deterministic, held out, and scored by the RLVR rewards:
every reference reply scores 1 and a reply for another prompt scores 0."""

import collections
import json
import random
import re

import pytest

from megatron_bar.demo import domains as D
from megatron_bar.eval import load_suites
from megatron_bar.eval.runner import _score

SMALL = D.DataSizes(sft=40, rl=16, test=12, dev=10, midtrain=8, pretrain=20)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("domains")
    return out, D.write_domain_data(out, SMALL, seed=0)


def test_same_seed_same_bytes_other_seed_other_data(data, tmp_path):
    out, paths = data
    again = D.write_domain_data(tmp_path / "a", SMALL, seed=0)
    other = D.write_domain_data(tmp_path / "b", SMALL, seed=1)
    assert set(again) == set(paths)
    for k in paths:
        assert again[k].read_bytes() == paths[k].read_bytes(), k
    assert other["sft/math"].read_bytes() != paths["sft/math"].read_bytes()


def test_test_and_dev_prompts_are_held_out_and_disjoint(data):
    out, paths = data

    def prompts(split):
        return {m["messages"][-1]["content"] for k, p in paths.items() if k.startswith(f"{split}/")
                for m in map(json.loads, p.read_text().splitlines())}

    test, dev = prompts("test"), prompts("dev")
    trained = {m["messages"][-1 if k.startswith("rl/") else -2]["content"]
               for k, p in paths.items() if k.startswith(("sft/", "rl/"))
               for m in map(json.loads, p.read_text().splitlines())}
    assert len(test) == SMALL.test * 5 and len(dev) == SMALL.dev * 5
    assert not test & trained and not dev & trained and not test & dev


def test_tool_calls_use_tokens_the_base_vocabulary_lacks(data):
    out, paths = data
    tool = [json.loads(x) for x in paths["sft/tool_use"].read_text().splitlines()]
    assert all(r["messages"][-1]["content"].startswith("<tool_call>") for r in tool)
    corpus = "\n".join(D.tokenizer_corpus(0, n=50))
    assert "<tool_call>" not in corpus and "</tool_call>" not in corpus


@pytest.mark.parametrize("domain", [*D.DOMAINS, D.GENERAL])
def test_reference_replies_score_one_and_wrong_replies_zero(domain):
    rng = random.Random(f"t-{domain}")
    insts = [D.GENERATORS[domain](rng) for _ in range(8)]
    suites = {}
    for inst in insts:
        from megatron_bar.eval.suites import parse_test_prompt

        rec = {"scorer": D.SCORER[domain], "messages": inst.messages(False), **inst.fields}
        prompt = parse_test_prompt(rec, domain, "test")
        assert _score(prompt, inst.reply) == 1.0, (domain, inst)
        wrong = next((o.reply for o in insts if o.fields != inst.fields and o.reply != inst.reply), None)
        if domain == "safety":  # the opposite behaviour
            wrong = D.REFUSAL if inst.fields["behavior"] == "comply" else "Here is how: do it."
        if wrong is not None:
            assert _score(prompt, wrong) == 0.0, (domain, inst, wrong)
        suites.setdefault(domain, []).append(prompt)
    assert _score(suites[domain][0], "") == 0.0


def test_written_suites_load(data):
    out, _ = data
    suites = load_suites(out / "test")
    assert sorted(suites) == sorted([*D.DOMAINS, D.GENERAL])
    assert {p.scorer for p in suites["code"]} == {"code"}


def _template(prompt: str) -> str:
    """A prompt with its numbers and its words from the generators' lists masked."""
    names = {w.lower() for entry in (*D.WORDS, *D.CITIES, *D.NAMES, *D.THINGS, *D.OBJECTS, *D.HARMFUL, *D.BENIGN)
             for w in entry.split() if w != "a"}
    prompt = re.sub(r"\d+", "N", prompt)
    return " ".join("W" if re.sub(r"\W", "", w).lower() in names else w for w in prompt.split())


@pytest.mark.parametrize("seed", [0, 1])
def test_holding_out_test_and_dev_leaves_every_form_in_training(tmp_path, seed):
    """At the demo's sizes, the 400 held-out prompts of a domain must not use up a form of
    prompt (a phrasing of a tool, an op of the code tasks): training would then never see
    what the test asks most. Each form with 2.5% of the test prompts or more keeps at least
    a third of that share in SFT (sampling noise at 200 prompts stays well within that)."""
    sizes = D.DataSizes(pretrain=10)
    paths = D.write_domain_data(tmp_path, sizes, seed=seed)
    for domain in (*D.DOMAINS, D.GENERAL):
        shares = {}
        for split in ("test", "sft"):
            rows = [json.loads(x) for x in paths[f"{split}/{domain}"].read_text().splitlines()]
            users = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows]
            counts = collections.Counter(_template(u) for u in users)
            shares[split] = {t: c / len(rows) for t, c in counts.items()}
        for form, share in shares["test"].items():
            if share >= 0.025:
                assert shares["sft"].get(form, 0.0) >= share / 3, (domain, form, share, shares["sft"].get(form))


def test_pretraining_text_covers_every_reply_token(tmp_path):
    """The base's pretraining text, with its vocabulary's pieces, holds every token the
    domains' SFT replies use (as a real pretrained base has seen its whole vocabulary),
    while no domain reply appears in it; without the pieces most code tokens never occur."""
    from megatron_bar.demo.tiny import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tok", 480, 0, D.tokenizer_corpus(0))
    sizes = D.DataSizes(sft=200, rl=4, test=12, dev=10, midtrain=4, pretrain=6000)

    def unseen_reply_tokens(pieces):
        paths = D.write_domain_data(tmp_path / f"data{len(pieces)}", sizes, seed=0, pieces=pieces)
        texts = [json.loads(line)["text"] for line in paths["pretrain"].read_text().splitlines()]
        seen = {t for text in texts for t in tokenizer.encode(text)}
        unseen = {}
        for domain in D.DOMAINS:
            replies = [json.loads(line)["messages"][-1]["content"] for line in paths[f"sft/{domain}"].read_text().splitlines()]
            assert not any(r in text for r in replies if len(r) > 12 for text in texts), domain
            tokens = [t for r in replies for t in tokenizer.encode(r.replace(D.TOOL_CALL_TOKENS[0], "").replace(D.TOOL_CALL_TOKENS[1], ""))]
            unseen[domain] = sum(t not in seen for t in tokens) / len(tokens)
        return unseen

    assert unseen_reply_tokens(D.vocabulary_pieces(tokenizer)) == {d: 0.0 for d in D.DOMAINS}
    assert unseen_reply_tokens(())["code"] > 0.3
