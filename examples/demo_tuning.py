"""Tuning runs of the BAR demo, scored on the dev split (never on test).

    python examples/demo_tuning.py --out runs/tune --seed 0 \
        --variants '{"v0": {}, "v2": {"midtrain_steps": 250, "sft_steps": 500}}' \
        --routers '{"v0r": ["v0", {"lr_router": 0.03, "router_epochs": 60}]}' \
        --mono '{"midtrain_steps": 250, "sft_steps": 500}' --mono-name mono2
    python examples/demo_tuning.py --out runs/tune_w256 --spec '{"hidden_size": 256, "intermediate_size": 1024}' \
        --variants '{"v0": {}}'

One base (data, tokenizer, pretraining, general SFT, upcycle) with the demo's settings;
then per variant (``DemoSettings`` fields overridden) the four BAR experts ([midtrain] ->
SFT; ``--rl`` adds RLVR), their merge and router stage; per ``--routers`` entry another
router stage on a variant's merge; and monolithic retraining with its own overrides.
Every row is evaluated on ``data/dev`` and a table is printed. Run again with the same
``--out`` and new variant names to add rows: steps whose output exists are not rerun.
"""

import argparse
import json
import re
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from megatron_bar.demo import domains as D
from megatron_bar.demo import pipeline as P
from megatron_bar.demo.jobs import Job, JobGraph, python_module

COLUMNS = [*D.DOMAINS, "general", "overall"]


def _noop() -> list[str]:
    return [sys.executable, "-c", "pass"]


def _finished(stage: P.Stage) -> bool:
    """A stage whose checkpoint is its last step. One stopped early (a kill: the trainer
    checkpoints on SIGTERM) runs again and resumes there; so does one counted in epochs."""
    latest = stage.output_dir / "checkpoints" / "latest"
    if not latest.is_file() or stage.steps <= 0:
        return False
    return latest.read_text().strip() == f"iter_{stage.steps:07d}"


def _json(ap: argparse.ArgumentParser, flag: str, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        ap.error(f"{flag}: not JSON ({e})")


def _replaced(ap: argparse.ArgumentParser, flag: str, obj, overrides: dict):
    """``obj`` (a dataclass) with ``overrides``; a parser error names a key it has no field for."""
    unknown = sorted(set(overrides) - {f.name for f in fields(obj)})
    if unknown:
        ap.error(f"{flag}: {', '.join(unknown)} not a field of {type(obj).__name__}")
    return replace(obj, **overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="{}", help="JSON: name -> DemoSettings overrides (BAR experts); "
                    "the key domains: [...] trains only those experts (no merge)")
    ap.add_argument("--routers", default="{}", help="JSON: name -> [variant, overrides] (router stage only)")
    ap.add_argument("--mono", default="", help="JSON overrides for monolithic retraining (empty: skip)")
    ap.add_argument("--mono-name", default="mono")
    ap.add_argument("--rl", action="store_true", help="RLVR in the experts (math, code)")
    ap.add_argument("--spec", default="{}", help="JSON: TinyModelSpec overrides for the whole run "
                    "(base included), e.g. '{\"hidden_size\": 256, \"intermediate_size\": 1024}'")
    a = ap.parse_args()
    out = a.out.resolve()
    s0 = P.DemoSettings(seed=a.seed)
    s0 = replace(s0, spec=_replaced(ap, "--spec", s0.spec, _json(ap, "--spec", a.spec)))
    if not a.rl:
        s0 = replace(s0, rl_steps=0)
    variants = _json(ap, "--variants", a.variants)
    routers = _json(ap, "--routers", a.routers)
    mono = _json(ap, "--mono", a.mono) if a.mono else None
    checks = [("--variants", {k: v for k, v in o.items() if k != "domains"}) for o in variants.values()]
    checks += [("--routers", o) for _, o in routers.values()] + [("--mono", mono or {})]
    for flag, overrides in checks:  # every bad key, before anything is written
        _replaced(ap, flag, s0, overrides)
    graph = JobGraph(out, P.REPO, parallel=2)
    (out / "models").mkdir(parents=True, exist_ok=True)
    p = P.Planner(s0, out, graph)

    def planner(overrides: dict) -> P.Planner:
        q = P.Planner(replace(s0, **overrides), out, graph)
        q.stages = p.stages  # one registry: every planner finds every stage's checkpoint
        return q

    graph.add(Job("base", fn=lambda: P._make_base(s0, out), cost=15))
    pre = p.train("pretrain", "base", "full", s0.pretrain_steps, s0.lr_pretrain,
                  [{"path": str(p.data / "pretrain.jsonl"), "kind": "text", "weight": 1.0, "domain": "general"}],
                  deps=("base",), threads=2)
    pre = p.train("base_sft", pre, "full", s0.base_sft_steps, s0.lr_sft, p._datasets({D.GENERAL: 1.0}), threads=2)
    p.tool("upcycle", "upcycle.py", ["--load", lambda: p.ckpt(pre), "--save", out / "models" / "upcycle"], deps=(pre,))
    rows: dict[str, tuple[P.Planner, str, int | None]] = {"base": (p, pre, None)}
    all_sft = {d: 1.0 for d in (*D.DOMAINS, D.GENERAL)}

    def router(q: P.Planner, name: str, merge: str) -> None:
        r = q.train(f"{name}_router", merge, "router", 0, q.s.lr_router, q._datasets(all_sft), deps=(merge,),
                    router_init=q.s.router_init, fraction=q.s.router_fraction, epochs=q.s.router_epochs)
        rows[f"{name} BAR"] = (q, r, None)
        rows[f"{name} BAR 4of5"] = (q, r, len(D.DOMAINS))

    for name, overrides in variants.items():
        domains = overrides.pop("domains", D.DOMAINS)  # a subset: those experts alone, no merge
        q = planner(overrides)
        chains = {d: P.expert_chain(q, f"{name}_{d}", d, "upcycle", stages=("midtrain", "sft", "rlvr"))
                  for d in domains}
        for d, chain in chains.items():
            rows[f"{name} expert {d}"] = (q, chain[-1], None)
        if set(domains) != set(D.DOMAINS):
            continue
        q.tool(f"{name}_merge", "merge_experts.py",
               ["--experts", *[(lambda d=d, q=q, c=chains: f"{d}={q.ckpt(c[d][-1])}") for d in D.DOMAINS],
                "--topk", str(len(D.DOMAINS) + 1), "--save", out / "models" / f"{name}_merge"],
               deps=[c[-1] for c in chains.values()])
        router(q, name, f"{name}_merge")
    for name, (variant, overrides) in routers.items():
        merge = f"{variant}_merge"
        if merge not in graph.jobs:  # a variant of an earlier run: its merge exists
            graph.add(Job(merge, command=_noop))
        router(planner(overrides), name, merge)
    if mono is not None:
        q = planner(mono)
        m = pre
        if q.s.midtrain_steps > 0:
            m = q.train(f"{a.mono_name}_midtrain", pre, "full", q.s.midtrain_steps * len(D.MIDTRAIN_DOMAINS),
                        q.s.lr_midtrain, q._datasets({d: 1.0 for d in D.MIDTRAIN_DOMAINS}, "text"))
        m = q.train(f"{a.mono_name}_sft", m, "full", q.s.sft_steps * len(D.DOMAINS), q.s.lr_sft,
                    q._datasets({**{d: 1.0 for d in D.DOMAINS}, D.GENERAL: float(len(D.DOMAINS))}), special=True)
        rows[a.mono_name] = (q, m, None)

    evals = {}
    for row, (q, job, topk) in rows.items():
        slug = re.sub(r"[^a-z0-9]+", "_", row.lower()).strip("_")
        evals[row] = out / "eval" / f"{slug}.json"

        def command(q=q, job=job, topk=topk, f=evals[row]):
            return python_module("megatron_bar.demo.report", "--row", json.dumps({"path": str(q.ckpt(job)), "topk": topk}),
                                 "--suites", out / "data" / "dev", "--max-new-tokens", s0.eval_max_new_tokens,
                                 "--out", f, "--score-cache", out / "eval" / "score_cache")
        graph.add(Job(f"eval_{slug}", command=command, deps=(job,), cost=s0.eval_cost))
    for name, job in graph.jobs.items():  # resume: a step whose output exists is not rerun
        stage = p.stages.get(name)
        done = ((stage is not None and _finished(stage))
                or (out / "models" / name).is_dir() or (name == "base" and (out / "models" / "base").is_dir())
                or (name.startswith("eval_") and (out / "eval" / f"{name[5:]}.json").is_file()))
        if done:
            job.fn, job.command = None, _noop
    t0 = time.time()
    graph.run()
    print(f"done in {(time.time() - t0) / 60:.1f} min; scores on the dev split")
    print(f"| row | {' | '.join(COLUMNS)} |\n|---|{'---|' * len(COLUMNS)}")
    for row, f in evals.items():
        scores = json.loads(f.read_text())["scores"]
        print(f"| {row} | " + " | ".join(f"{scores[c]:.1f}" for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
