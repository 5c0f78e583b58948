"""megatron_bar.eval: greedy decoding checked against transformers' own generate, and
the suite format's errors."""

import json

import pytest
import torch

from helpers import tiny_hf_model

from megatron_bar.eval import SuiteError, evaluate, greedy_generate, load_suites, write_suite


def _prompts(n=6, vocab=1001, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _hf_greedy(model, prompt, steps, eos):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=steps, eos_token_id=eos, pad_token_id=1)
    tokens = out[0, len(prompt):].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@pytest.fixture(scope="module")
def reference(hf_dense_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dense_dir).eval()
    prompts = _prompts()
    # eos = a token the random model does emit, so that stopping is exercised
    first = _hf_greedy(model, prompts[0], 6, eos=-1)
    eos = first[3]
    return model, prompts, eos, [_hf_greedy(model, p, 10, eos) for p in prompts]


def test_megatron_batched_left_padded_equals_transformers_one_by_one(reference, mcore_dense_dir):
    import megatron_bar

    _, prompts, eos, expected = reference
    model = megatron_bar.load_model(mcore_dense_dir)
    got = greedy_generate(model, prompts, eos_id=eos, pad_id=1, max_new_tokens=10, batch_size=4)
    assert got == expected
    assert any(len(g) < 10 for g in got), "no completion stopped at EOS: the test lost its point"


def test_hf_model_and_plain_callable(reference):
    model, prompts, eos, expected = reference
    assert greedy_generate(model, prompts, eos_id=eos, pad_id=1, max_new_tokens=10, batch_size=6) == expected
    plain = lambda ids: model(ids).logits  # noqa: E731 - no mask: batched by equal length only
    assert greedy_generate(plain, prompts, eos_id=eos, pad_id=1, max_new_tokens=10, batch_size=6) == expected


class ScriptedLM(torch.nn.Module):
    """Answers every prompt with fixed tokens: logits one-hot on the next scripted token."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab = script, vocab

    def forward(self, ids):
        b, s = ids.shape
        logits = torch.zeros(b, s, self.vocab)
        for row in range(b):
            seq = ids[row].tolist()
            start = max(i for i, t in enumerate(seq) if t == self.marker) + 1
            k = s - start - 1  # the prompt ends with the marker and a newline
            logits[row, -1, self.script[k] if k < len(self.script) else self.eos] = 1.0
        return logits


def test_evaluate_scores_replies_with_the_suites_scorers(tmp_path):
    from megatron_bar.demo.tiny import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok", vocab_size=400)
    write_suite(tmp_path / "suites" / "math.jsonl", [
        {"prompt": "What is 3 + 4?", "scorer": "math", "answer": "7"},
        {"prompt": "What is 2 + 2?", "scorer": "math", "answer": "4"}])
    write_suite(tmp_path / "suites" / "general.jsonl", [
        {"prompt": "Copy: seven", "scorer": "exact", "answer": "7"},
        {"prompt": "Copy: eight", "scorer": "exact", "answer": "8"},
        {"prompt": "Copy: nine", "scorer": "exact", "answer": "9"},
        {"prompt": "Copy: ten", "scorer": "exact", "answer": "10"}])
    lm = ScriptedLM(tok.encode("7"), tok.vocab_size)
    lm.marker, lm.eos = tok.token_to_id("<|assistant|>"), tok.eos_id
    scores = evaluate(lm, tok, load_suites(tmp_path / "suites"))
    assert scores == {"math": 50.0, "general": 25.0, "overall": 37.5}


def test_suite_errors_name_file_and_line(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "math.jsonl").write_text(json.dumps({"prompt": "1+1?", "scorer": "math", "answer": "2"}) + "\n{oops\n")
    with pytest.raises(SuiteError, match=r"math.jsonl:2: invalid JSON"):
        load_suites(d)
    (d / "math.jsonl").write_text(json.dumps({"prompt": "1+1?", "scorer": "nope"}) + "\n")
    with pytest.raises(SuiteError, match=r"math.jsonl:1: .*nope"):
        load_suites(d)
    (d / "math.jsonl").write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}],
                                              "scorer": "math"}) + "\n")
    with pytest.raises(SuiteError, match="assistant"):
        load_suites(d)
    with pytest.raises(SuiteError, match="no suite file"):
        load_suites(d, domains=["code"])


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_transformers_copy_gives_the_megatron_models_logits_and_replies(which, mcore_dense_dir, tiny_base):
    import megatron_bar
    from megatron_bar.convert import to_transformers

    path = mcore_dense_dir if which == "dense" else tiny_base["bar2"]
    model = megatron_bar.load_model(path, moe_topk=1 if which == "moe" else None)
    if which == "moe":  # distinct experts and a router that prefers one per token
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "local_experts.1" in name or "router" in name:
                    p.add_(torch.randn_like(p) * 0.3)
    copy = to_transformers(model)
    prompts = _prompts(vocab=min(1001, model.config.vocab_size))
    ids = torch.tensor([prompts[0]])
    torch.testing.assert_close(copy(ids).logits, model(ids), atol=2e-5, rtol=1e-4)
    eos = greedy_generate(model, prompts[:1], eos_id=-1, max_new_tokens=4)[0][2]
    got = greedy_generate(copy, prompts, eos_id=eos, pad_id=1, max_new_tokens=10, batch_size=4)
    assert got == greedy_generate(model, prompts, eos_id=eos, pad_id=1, max_new_tokens=10, batch_size=4)


def test_transformers_copy_refuses_a_model_with_an_expert_selection(tiny_base):
    """A dropped expert lives in megatron's routers only: the transformers copy would serve
    it again, so the copy is refused rather than made wrong."""
    import megatron_bar
    from megatron_bar.convert import to_transformers

    model = megatron_bar.load_model(tiny_base["bar2"], drop_experts=[1])
    with pytest.raises(ValueError, match="expert selection.*dropped: "):
        to_transformers(model)
    to_transformers(megatron_bar.load_model(tiny_base["bar2"], moe_topk=1))  # top-k alone carries over
