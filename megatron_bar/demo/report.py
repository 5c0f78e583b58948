"""The demo's outputs: every row evaluated, the findings checked, the cost table, plots.

Rows are models; columns are the domains, ``general`` and ``overall`` (the mean of the
five suites), each a score in [0, 100] measured by :func:`megatron_bar.eval.evaluate`.
The findings of the method (``CLAIMS``) are checked against these measured numbers with
thresholds written here; the numbers themselves always come from the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_bar.demo import domains as D

COLUMNS = [*D.DOMAINS, "general", "overall"]


# -- loading the rows -------------------------------------------------------------------

def load_row_model(spec: dict):
    """``(model, tokenizer)`` of a row spec: ``{"path": dir, "topk": k}``, ``{"average":
    [dir, ...]}`` (dense weight merging) or ``{"hf": dir}`` (see pipeline._resolve_row)."""
    import megatron_bar
    from megatron_bar.data.tokenizer import load_tokenizer

    if "hf" in spec:
        from transformers import AutoModelForCausalLM

        path = Path(spec["hf"])
        return AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)
    if "average" in spec:
        paths = [Path(j) for j in spec["average"]]
        model = megatron_bar.load_model(paths[0])
        state = model.state_dict()
        keys = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]
        acc = {k: state[k].clone() for k in keys}
        for p in paths[1:]:
            other = megatron_bar.load_model(p).state_dict()
            for k in keys:
                acc[k] += other[k]
        model.load_state_dict({**state, **{k: v / len(paths) for k, v in acc.items()}})
        return model, load_tokenizer(paths[0] / "tokenizer")
    path = Path(spec["path"])
    return megatron_bar.load_model(path, moe_topk=spec.get("topk")), load_tokenizer(path / "tokenizer")


def evaluate_row(spec: dict, suites, max_new_tokens: int) -> dict:
    """One row's scores (rounded, in :data:`COLUMNS`) and its first replies per domain.
    A row with fewer experts active than its checkpoint has (``topk``) also reports how
    far its next-token distributions are from the same checkpoint with every expert
    active (:func:`topk_change`): equal scores then do not mean an unchanged model."""
    from megatron_bar.convert import to_transformers
    from megatron_bar.eval import evaluate_detailed

    model, tok = load_row_model(spec)
    # decoded through the transformers copy, for its KV cache: the same replies (the
    # conversion is exact, and the export row checks it from disk) at a fraction of the time
    decoder = model if "hf" in spec else to_transformers(model)
    res = evaluate_detailed(decoder, tok, suites, max_new_tokens=max_new_tokens, batch_size=64)
    out = {"scores": {c: round(res.scores[c], 2) for c in COLUMNS},
           "samples": {d: v[:3] for d, v in res.samples.items()}}
    if spec.get("topk"):
        full, _ = load_row_model({**spec, "topk": None})
        out["topk_change"] = topk_change(full, model, tok, suites)
    return out


@torch.no_grad()
def topk_change(full, reduced, tokenizer, suites, per_domain: int = 32) -> dict:
    """How much a model with fewer experts active differs from the same model with all of
    them, at the first reply token of ``per_domain`` prompts of each suite: the mean KL
    divergence KL(full || reduced), the mean and largest absolute log-probability
    difference, and the share of prompts whose greedy first token changes."""
    from megatron_bar.data.chat import ChatTemplate, Message

    template = ChatTemplate(tokenizer)
    kl, mean_abs, max_abs, flips, n = 0.0, 0.0, 0.0, 0, 0
    for prompts in suites.values():
        for prompt in prompts[:per_domain]:
            ids = torch.tensor([template.encode_prompt([Message(r, c) for r, c in prompt.messages])])
            a = torch.log_softmax(full(ids)[0, -1].float(), -1)
            b = torch.log_softmax(reduced(ids)[0, -1].float(), -1)
            kl += float((a.exp() * (a - b)).sum())
            mean_abs += float((a - b).abs().mean())
            max_abs = max(max_abs, float((a - b).abs().max()))
            flips += int(a.argmax() != b.argmax())
            n += 1
    return {"prompts": n, "mean_kl": kl / n, "mean_abs_logprob_diff": mean_abs / n,
            "max_abs_logprob_diff": max_abs, "first_token_changed": flips / n}


def main(argv=None) -> None:
    """One row's evaluation as a step of the demo (so that it runs beside training):

        python -m megatron_bar.demo.report --row '{"path": DIR}' --suites DIR --out FILE
    """
    import argparse

    from megatron_bar.eval import load_suites
    from megatron_bar.eval.runner import load_score_cache, save_score_cache

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    ap.add_argument("--row", required=True, help="the row spec, JSON (see load_row_model)")
    ap.add_argument("--suites", required=True, help="folder of test suites (<domain>.jsonl)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--out", required=True, help="JSON file: scores and samples")
    ap.add_argument("--score-cache", help="folder of verdicts shared by the demo's rows (the same reply to "
                                          "the same prompt is scored once: the code sandbox is the slow part)")
    a = ap.parse_args(argv)
    suites = load_suites(a.suites, domains=[*D.DOMAINS, "general"])
    if a.score_cache:
        load_score_cache(a.score_cache)
    result = evaluate_row(json.loads(a.row), suites, a.max_new_tokens)
    if a.score_cache:
        save_score_cache(Path(a.score_cache) / f"{Path(a.out).stem}.json")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(a.out), json.dumps(result, indent=1))


# -- the findings -------------------------------------------------------------------------

def check_claims(t: dict[str, dict], topk_change: dict | None = None) -> list[dict]:
    """Each finding of the method, checked on the measured table. ``t[row][col]``;
    ``topk_change``: the N-1 row's :func:`topk_change` against all experts, which the
    N-1 finding requires to be non-zero (else dropping an expert changed nothing)."""
    out = []

    def claim(text, rows, ok, detail):
        if all(r in t for r in rows):
            out.append({"claim": text, "reproduced": bool(ok()), "measured": detail()})

    bar = "BAR"
    claim("BAR is close to (within 2 points) or above monolithic retraining (overall)",
          [bar, "monolithic retraining"],
          lambda: t[bar]["overall"] >= t["monolithic retraining"]["overall"] - 2,
          lambda: f"BAR {t[bar]['overall']:.1f} vs monolithic {t['monolithic retraining']['overall']:.1f}")
    experts = [f"expert: {d}" for d in D.DOMAINS]
    claim("merging loses little against each expert alone (each loses <= 5 points on its own domain)",
          [bar, *experts],
          lambda: all(t[f"expert: {d}"][d] - t[bar][d] <= 5 for d in D.DOMAINS),
          lambda: ", ".join(f"{d} {t[f'expert: {d}'][d]:.1f} -> {t[bar][d]:.1f}" for d in D.DOMAINS))
    claim("dense weight merging is far below BAR (>= 10 points overall)", [bar, "dense weight merging"],
          lambda: t["dense weight merging"]["overall"] <= t[bar]["overall"] - 10,
          lambda: f"dense merge {t['dense weight merging']['overall']:.1f} vs BAR {t[bar]['overall']:.1f}")
    fz = "expert: tool_use, frozen embeddings"
    claim("the tool-use expert fails without embedding unfreezing (>= 20 points below on tool use)",
          [fz, "expert: tool_use"],
          lambda: t[fz]["tool_use"] <= t["expert: tool_use"]["tool_use"] - 20,
          lambda: f"frozen {t[fz]['tool_use']:.1f} vs unfrozen {t['expert: tool_use']['tool_use']:.1f}")
    do = "expert: safety, domain data only"
    claim("domain-only SFT loses general ability (>= 5 points below on general)", [do, "expert: safety"],
          lambda: t[do]["general"] <= t["expert: safety"]["general"] - 5,
          lambda: f"domain only {t[do]['general']:.1f} vs with general data {t['expert: safety']['general']:.1f}")
    nm1 = [r for r in t if r.startswith("BAR, ") and "experts active" in r]
    if nm1:
        change = topk_change or {}

        def nm1_detail():
            text = f"{nm1[0]} {t[nm1[0]]['overall']:.1f} vs all {t[bar]['overall']:.1f}"
            if change:
                text += (f"; dropping one expert per token changes the first reply token's distribution by "
                         f"KL {change['mean_kl']:.2g} on average (largest log-prob change "
                         f"{change['max_abs_logprob_diff']:.2g}) and its greedy token on "
                         f"{100 * change['first_token_changed']:.0f}% of {change['prompts']} prompts")
            return text

        claim("N-1 of N experts active is close to N (within 3 points overall), in a model that changes",
              [bar, nm1[0]],
              lambda: abs(t[nm1[0]]["overall"] - t[bar]["overall"]) <= 3 and change.get("mean_kl", 0.0) > 0,
              nm1_detail)
    up = "BAR + code v2 (upgrade)"
    others = [c for c in (*D.DOMAINS, "general") if c != "code"]
    claim("an upgrade raises its domain while the others stay within 2 points", [bar, up],
          lambda: t[up]["code"] > t[bar]["code"] and all(abs(t[up][c] - t[bar][c]) <= 2 for c in others),
          lambda: ", ".join(f"{c} {t[up][c] - t[bar][c]:+.1f}" for c in (*D.DOMAINS, "general")))
    return out


# -- costs ----------------------------------------------------------------------------------

def stage_tokens(stage, tokenizer=None) -> int:
    """Tokens processed by a training stage (sequences x length; RL: prompt + responses)."""
    metrics = [json.loads(x) for x in (stage.output_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = metrics[-1]["step"] if metrics else 0
    if not stage.rl:
        return int(steps * stage.tokens_per_step)
    import yaml

    cfg = yaml.safe_load(stage.config.read_text())
    n = cfg["rl"]["prompts_per_rollout"] * cfg["rl"]["samples_per_prompt"]
    prompt_len = 0
    if tokenizer is not None:
        lines = []
        for ds in cfg["rl"]["datasets"]:
            lines += [json.loads(x) for x in Path(ds["path"]).read_text().splitlines() if x.strip()]
        prompt_len = sum(len(tokenizer.encode(" ".join(m["content"] for m in r["messages"]))) for r in lines) / len(lines)
    return int(sum(n * (prompt_len + m.get("response_length", 0)) for m in metrics))


def cost_table(groups: dict[str, list[str]], stages: dict, tokenizer, per_domain_bar: dict[str, list[str]],
               router_job: str) -> dict:
    tokens = {job: stage_tokens(stages[job], tokenizer) for g in groups.values() for job in g if job in stages}
    build = {g: sum(tokens[j] for j in jobs if j in tokens) for g, jobs in groups.items()}
    per_domain = {d: sum(tokens[j] for j in jobs) for d, jobs in per_domain_bar.items()}
    router = tokens.get(router_job, 0)
    mono = build.get("monolithic retraining")
    # adding domains one at a time: BAR trains the new expert and the router; monolithic
    # retraining trains on every domain so far, so its total grows quadratically.
    growth = []
    doms = list(per_domain)
    for n in range(1, len(doms) + 1):
        bar_total = sum(per_domain[d] for d in doms[:n]) + n * router
        mono_total = sum(sum(per_domain[d] for d in doms[:k]) for k in range(1, n + 1))
        growth.append({"domains": n, "BAR": bar_total, "monolithic retraining": mono_total,
                       "BAR: add one more": per_domain[doms[n - 1]] + router,
                       "monolithic: add one more": sum(per_domain[d] for d in doms[:n])})
    return {"stage_tokens": tokens, "build": build, "per_domain_expert": per_domain, "router": router,
            "upgrade_one_domain": {"BAR (new code expert + router)": build.get("upgrade code: BAR"),
                                   "monolithic retraining (retrain everything)": mono},
            "growth": growth}


# -- plots --------------------------------------------------------------------------------------

def plot_table(table: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = list(table)
    x = np.arange(len(COLUMNS))
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(13, 5.5))
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(rows):
        ax.bar(x + i * width - 0.4 + width / 2, [table[r][c] for c in COLUMNS], width, label=r, color=cmap(i % 20))
    ax.set_xticks(x, COLUMNS)
    ax.set_ylabel("score (0-100)")
    ax.set_ylim(0, 100)
    ax.set_title("BAR demo: every model on every held-out suite")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_rewards(curves: dict[str, Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, metrics in curves.items():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        ax.plot([r["step"] for r in rows], [r["reward_mean"] for r in rows], marker="o", label=label)
    ax.set_xlabel("RLVR step")
    ax.set_ylabel("mean reward")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("RLVR reward curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_router(stats_json: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stats = json.loads(stats_json.read_text())
    doms = list(stats["domains"])
    # routing weight share: with every expert active (top-k = N) the selection shares are 1/N
    share = np.array([stats["domains"][d].get("weight_mean", stats["domains"][d]["mean"]) for d in doms])
    fig, ax = plt.subplots(figsize=(1.4 * len(stats["experts"]) + 2, 0.6 * len(doms) + 1.5))
    im = ax.imshow(share, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(stats["experts"])), stats["experts"])
    ax.set_yticks(range(len(doms)), doms)
    for i in range(len(doms)):
        for j in range(share.shape[1]):
            ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", color="w" if share[i, j] < 0.5 else "k",
                    fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("data domain")
    ax.set_title("BAR router: share of each domain's tokens per expert")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# -- writing ---------------------------------------------------------------------------------

def _fmt_tokens(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def render_markdown(result: dict) -> str:
    t = result["table"]
    lines = [f"# BAR demo results ({'quick' if result['settings']['quick'] else 'full'}, seed {result['settings']['seed']})",
             "", "Scores in [0, 100] on held-out prompts, greedy decoding (`megatron_bar.eval`).", "",
             "| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for r, v in t.items():
        lines.append(f"| {r} | " + " | ".join(f"{v[c]:.1f}" for c in COLUMNS) + " |")
    lines += ["", "## The method's findings, checked on this table", "", "| finding | reproduced | measured |",
              "|---|---|---|"]
    for c in result["claims"]:
        lines.append(f"| {c['claim']} | {'yes' if c['reproduced'] else 'no'} | {c['measured']} |")
    cost = result.get("cost")
    if cost:
        lines += ["", "## Cost: tokens processed", "", "| approach | build (all domains) |", "|---|---|"]
        for g, n in cost["build"].items():
            if not g.startswith("upgrade"):
                lines.append(f"| {g} | {_fmt_tokens(n)} |")
        lines += ["", "| upgrade one domain (code) | tokens |", "|---|---|"]
        for g, n in cost["upgrade_one_domain"].items():
            lines.append(f"| {g} | {_fmt_tokens(n)} |")
        lines += ["", "Adding domains one at a time (from the measured per-domain costs):", "",
                  "| domains | BAR total | monolithic total | BAR: add the last | monolithic: add the last |",
                  "|---|---|---|---|---|"]
        for g in cost["growth"]:
            lines.append(f"| {g['domains']} | {_fmt_tokens(g['BAR'])} | {_fmt_tokens(g['monolithic retraining'])} | "
                         f"{_fmt_tokens(g['BAR: add one more'])} | {_fmt_tokens(g['monolithic: add one more'])} |")
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in result["plots"]), "",
              f"Wall time: {result['timing']['total_s'] / 60:.1f} min (not part of the reproducible table)."]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
