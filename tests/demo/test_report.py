"""The demo's findings check: the N-1 finding needs a model that dropping an expert changes;
merging loses little only where every expert does."""

import megatron_bar
from megatron_bar.data.tokenizer import load_tokenizer
from megatron_bar.demo import domains as D
from megatron_bar.demo.report import check_claims, topk_change
from megatron_bar.eval import load_suites


def _table(overall_bar: float, overall_nm1: float) -> dict:
    row = {c: 50.0 for c in (*D.DOMAINS, "general")}
    return {"BAR": {**row, "overall": overall_bar}, "BAR, 4 of 5 experts active": {**row, "overall": overall_nm1}}


def test_nm1_finding_requires_a_changed_model_and_close_scores():
    def nm1(table, change):
        return next(c for c in check_claims(table, change) if c["claim"].startswith("N-1"))

    changed = {"prompts": 4, "mean_kl": 0.01, "mean_abs_logprob_diff": 0.1, "max_abs_logprob_diff": 0.5,
               "first_token_changed": 0.25}
    assert nm1(_table(60, 59), changed)["reproduced"]
    assert not nm1(_table(60, 56), changed)["reproduced"]  # 4 points apart
    assert not nm1(_table(60, 60), {**changed, "mean_kl": 0.0})["reproduced"]  # vacuous: nothing changed
    assert not nm1(_table(60, 60), None)["reproduced"]  # unmeasured is not reproduced
    assert "KL 0.01" in nm1(_table(60, 59), changed)["measured"]


def test_merge_finding_holds_for_each_expert_not_on_average():
    def merge(bar_scores):
        table = {f"expert: {d}": {d: 80.0} for d in D.DOMAINS}
        table["BAR"] = dict(zip(D.DOMAINS, bar_scores))
        return next(c for c in check_claims(table) if c["claim"].startswith("merging loses little"))

    assert merge([75.0, 80.0, 78.0, 81.0])["reproduced"]  # the largest loss is 5
    assert not merge([72.0, 80.0, 80.0, 80.0])["reproduced"]  # one loses 8: the mean (2) is not the test
    assert "math 80.0 -> 72.0" in merge([72.0, 80.0, 80.0, 80.0])["measured"]


def test_topk_change_is_zero_for_the_same_model_and_positive_for_fewer_experts(tiny_base, tmp_path):
    D.write_domain_data(tmp_path, D.DataSizes(sft=4, rl=2, test=3, dev=1, midtrain=2, pretrain=2))
    suites = load_suites(tmp_path / "test")
    tok = load_tokenizer(tiny_base["bar2"] / "tokenizer")
    full = megatron_bar.load_model(tiny_base["bar2"])
    again = megatron_bar.load_model(tiny_base["bar2"])
    same = topk_change(full, again, tok, suites, per_domain=2)
    assert same["prompts"] == 10 and same["mean_kl"] == 0 and same["max_abs_logprob_diff"] == 0
    # top-1 of 2 without renormalisation: the one expert left is weighted by its router
    # probability, so even identical experts give another distribution
    top1 = megatron_bar.load_model(tiny_base["bar2"], moe_topk=1)
    moved = topk_change(full, top1, tok, suites, per_domain=2)
    assert moved["mean_kl"] > 1e-6 and moved["max_abs_logprob_diff"] > 0
