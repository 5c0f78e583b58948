"""The embedded default demo: the whole BAR pipeline, its baselines and ablations, on a
tiny model on CPU, ending in a results table, plots and a cost table.

    python examples/bar_demo.py [--quick] [--out runs/bar_demo] [--seed 0]

Every step goes through the tools a cluster user runs, each in its own process:

  data (megatron_bar.demo.domains) -> tiny dense Olmo 2 (random) -> pretrain on general
  text (python -m megatron_bar.train, stage full) -> tools/upcycle.py -> per domain:
  [midtrain] -> sft -> [rlvr] (python -m megatron_bar.train / megatron_bar.rl) ->
  tools/merge_experts.py -> router stage -> evaluation (megatron_bar.eval) ->
  tools/convert_mcore_to_hf.py (the export is evaluated too, through transformers).

Baselines and ablations, on the same data and step budget (see :func:`build_graph`):
monolithic retraining, sequential training, dense weight merging, BTX-style experts,
tool use with frozen embeddings, domain-only SFT, N-1 of N experts, and an upgrade of
the code expert through ``merge_experts.py --base --replace`` plus router retraining.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from megatron_bar.demo import domains as D
from megatron_bar.demo.jobs import Job, JobGraph, python_module, python_script
from megatron_bar.demo.tiny import TinyModelSpec

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


@dataclass(frozen=True)
class DemoSettings:
    quick: bool = False
    seed: int = 0
    spec: TinyModelSpec = TinyModelSpec(vocab_size=480, hidden_size=128, intermediate_size=512,
                                        num_layers=4, num_attention_heads=4, num_kv_heads=2,
                                        max_position_embeddings=512)
    sizes: D.DataSizes = D.DataSizes(pretrain=20000)
    seq_length: int = 128
    global_batch_size: int = 8
    micro_batch_size: int = 8
    pretrain_steps: int = 1500
    base_sft_steps: int = 300
    # chosen on the dev split (README, "The demo": the tuning runs): 500 / 500 against 250 / 500
    # and 60 / 300
    midtrain_steps: int = 500
    sft_steps: int = 500
    rl_steps: int = 12
    # the router stage: 282 steps either way; chosen on the dev split (README, "The demo"):
    # all of the SFT data for 1.5 epochs rather than 5% for 30, rows fitted to each
    # expert's own routing on its domain first (router_init domain_routing)
    router_epochs: float = 1.5
    router_fraction: float = 1.0
    upgrade_factor: float = 2.0  # the code v2 expert trains this many times longer
    lr_pretrain: float = 3e-3
    lr_midtrain: float = 2e-3
    lr_sft: float = 3e-3
    lr_rl: float = 3e-4
    lr_router: float = 3e-3  # chosen on the dev split against 1e-2 and 1e-3 (README, "The demo")
    router_init: str = "domain_routing"  # none: the experts' own rows; domain_means, domain_probe
    # LR multiplier of the shared parameters in the BAR expert stages (optim.shared_lr_scale):
    # at this size, experts whose embeddings and LM head moved at the stage's LR (the
    # recipe's choice at 7B) lose their domains when the merge averages those parameters;
    # the dev-split measurements are in the README ("The demo").
    shared_lr_scale: float = 0.1
    embedding_lr_scale: float = 0.01
    # ... except in the stage that adds the tool-call tokens: the method unfreezes the
    # embeddings in SFT for exactly this (new tokens), and at 0.01 their rows barely move.
    new_token_embedding_lr_scale: float = 0.1
    # optim.train_only_added_vocab_rows in the BAR expert stages: "no"; "added" (the stage
    # that adds the tool-call tokens trains only their rows, at new_token_embedding_lr_scale,
    # embedding and LM head alike); "all" (that, and no other expert stage trains a
    # vocabulary row). "added", chosen on the dev split against "no" and "all" (README, "The
    # demo"): the merge averages the embedding, and the tool expert's moves of the rows every
    # expert shares were what its domain lost in the merge.
    vocab_rows: str = "added"
    rl_prompts: int = 8
    rl_samples: int = 8
    rl_max_tokens: int = 24
    parallel: int = 2
    eval_max_new_tokens: int = 40
    eval_cost: float = 20  # estimated seconds of one row's evaluation (the progress bar's weight)
    baselines: bool = True  # monolithic, sequential, dense merge
    btx: bool = True  # the BTX-style baseline (4 more expert pipelines)
    baseline_rl: bool = True  # RLVR in the baselines too (the quick demo skips it)

    @classmethod
    def preset(cls, quick: bool, seed: int = 0) -> "DemoSettings":
        if not quick:
            return cls(seed=seed)
        return cls(
            quick=True, seed=seed,
            spec=TinyModelSpec(vocab_size=480, hidden_size=64, intermediate_size=128, num_layers=2,
                               num_attention_heads=4, num_kv_heads=2, max_position_embeddings=512),
            sizes=D.DataSizes(sft=96, rl=32, test=16, dev=16, midtrain=64, pretrain=400),
            pretrain_steps=30, base_sft_steps=8, midtrain_steps=0, sft_steps=12, rl_steps=2, router_epochs=1.0,
            btx=False, baseline_rl=False,
            router_fraction=0.2, rl_prompts=4, rl_samples=4, rl_max_tokens=16, eval_max_new_tokens=32, eval_cost=8,
        )


# -- configs -------------------------------------------------------------------------------

def _final_checkpoint(output_dir: Path) -> Path:
    latest = output_dir / "checkpoints" / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"{latest}: the stage wrote no checkpoint")
    return output_dir / "checkpoints" / latest.read_text().strip()


@dataclass
class Stage:
    """One training stage: its config file and where its final checkpoint will be."""
    name: str
    config: Path
    output_dir: Path
    rl: bool = False
    steps: int = 0
    tokens_per_step: int = 0

    @property
    def checkpoint(self) -> Path:
        return _final_checkpoint(self.output_dir)


class Planner:
    """Writes the stage configs and adds the jobs of the demo to a :class:`JobGraph`."""

    def __init__(self, s: DemoSettings, run: Path, graph: JobGraph):
        self.s, self.run, self.graph = s, run, graph
        self.data = run / "data"
        self.stages: dict[str, Stage] = {}
        self.models: dict[str, Path | str] = {}  # row name -> checkpoint (resolved lazily)

    # paths of a job's final model
    def ckpt(self, job: str) -> Path:
        if job in self.stages:
            return self.stages[job].checkpoint
        return self.run / "models" / job

    def _datasets(self, domain_weights: dict[str, float], kind: str = "chat") -> list[dict]:
        sub = "sft" if kind == "chat" else "midtrain"
        return [{"path": str(self.data / sub / f"{d}.jsonl"), "kind": kind, "weight": w, "domain": d}
                for d, w in domain_weights.items()]

    def _shared_lr(self, stage: str, special: bool) -> dict:
        """The optim settings of the shared parameters (they apply in the BAR expert stages)."""
        s = self.s
        by_group = {"embedding": s.new_token_embedding_lr_scale if special else s.embedding_lr_scale}
        rows_only = stage in ("midtrain", "sft", "rlvr") and (s.vocab_rows == "all" or (s.vocab_rows == "added" and special))
        if rows_only and special:
            by_group["lm_head"] = s.new_token_embedding_lr_scale
        return {"shared_lr_scale": s.shared_lr_scale, "shared_lr_scale_by_group": by_group,
                "train_only_added_vocab_rows": rows_only}

    def train(self, name: str, load_job: str, stage: str, steps: int, lr: float, datasets: list[dict],
              deps=(), special: bool = False, router_init: str = "none", fraction: float = 1.0,
              epochs: float | None = None, label: str = "", threads: int = 1) -> str:
        s = self.s
        out = self.run / "stages" / name
        cfg = {
            "model": {"load": "<set at launch>"},
            "data": {"datasets": datasets, "seq_length": s.seq_length, "sample_fraction": fraction,
                     "add_special_tokens": list(D.TOOL_CALL_TOKENS) if special else []},
            "optim": {"lr": lr, "schedule": "cosine" if stage != "router" else "constant",
                      "warmup_steps": 0 if stage == "router" else max(1, steps // 10), "clip_grad": 1.0,
                      **self._shared_lr(stage, special)},
            "train": {"stage": stage, "steps": None if epochs else steps, "epochs": epochs or 1.0,
                      "global_batch_size": s.global_batch_size, "micro_batch_size": s.micro_batch_size,
                      "seed": s.seed + 1234, "log_interval": max(1, steps // 10), "output_dir": str(out)},
            "checkpoint": {"interval": 100000, "keep_last": 1},
            # the router stage's init fits on 64 sequences of each domain (16 by default)
            "router": {"init": router_init, "stats": stage in ("sft", "midtrain", "router"),
                       **({"stats_sequences": 64} if stage == "router" else {})},
        }
        config = self.run / "configs" / f"{name}.yaml"
        self.stages[name] = Stage(name, config, out, steps=steps,
                                  tokens_per_step=s.global_batch_size * s.seq_length)

        def command():
            cfg["model"]["load"] = str(self.ckpt(load_job))
            _write_yaml(config, cfg)
            return python_module("megatron_bar.train", config)

        self.graph.add(Job(name, command=command, deps=tuple(deps) + ((load_job,) if load_job in self.graph.jobs else ()),
                           cost=6 + steps * self._step_cost(stage) / threads, label=label or name,
                           threads=threads))
        return name

    def rl(self, name: str, load_job: str, rl_domains: list[str], stage: str, label: str = "",
           steps: int | None = None) -> str:
        s = self.s
        steps = steps or s.rl_steps
        out = self.run / "stages" / name
        cfg = {
            "model": {"load": "<set at launch>"},
            "rl": {"datasets": [{"path": str(self.data / "rl" / f"{d}.jsonl"), "reward": d} for d in rl_domains],
                   "samples_per_prompt": s.rl_samples, "prompts_per_rollout": s.rl_prompts,
                   "temperature": 1.0, "max_response_tokens": s.rl_max_tokens, "num_workers": 1,
                   "timeout_s": 600.0},
            "optim": {"lr": s.lr_rl, "schedule": "constant", "clip_grad": 1.0, **self._shared_lr(stage, False)},
            "train": {"stage": stage, "steps": steps, "micro_batch_size": s.rl_prompts * s.rl_samples,
                      "global_batch_size": s.rl_prompts * s.rl_samples,
                      "seed": s.seed + 1234, "log_interval": 1, "output_dir": str(out)},
            "checkpoint": {"interval": 1, "keep_last": 1},
        }
        config = self.run / "configs" / f"{name}.yaml"
        self.stages[name] = Stage(name, config, out, rl=True, steps=steps)

        def command():
            cfg["model"]["load"] = str(self.ckpt(load_job))
            _write_yaml(config, cfg)
            return python_module("megatron_bar.rl", config)

        # Each RLVR stage starts its own local Ray. A retry resumes from its checkpoint
        # (a Ray cluster can be stopped under us on a shared machine).
        self.graph.add(Job(name, command=command, deps=(load_job,), cost=25 + steps * 4, label=label or name,
                           retries=1))
        return name

    def tool(self, name: str, script: str, args, deps, cost: float = 8, label: str = "") -> str:
        self.graph.add(Job(name, command=lambda: python_script(TOOLS / script, *[a() if callable(a) else a for a in args]),
                           deps=tuple(deps), cost=cost, label=label or name))
        return name

    def _step_cost(self, stage: str) -> float:
        base = 0.25 if not self.s.quick else 0.12
        return base * (0.6 if stage == "router" else 1.0)


def _write_yaml(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


# -- the graph -----------------------------------------------------------------------------

@dataclass
class Plan:
    planner: Planner
    rows: dict[str, dict] = field(default_factory=dict)  # row -> {"load": job, "topk": ...}
    rl_runs: dict[str, str] = field(default_factory=dict)  # curve label -> rl job
    router_job: str = ""
    export_job: str = ""
    cost_groups: dict[str, list[str]] = field(default_factory=dict)  # approach -> its training jobs
    eval_files: dict[str, Path] = field(default_factory=dict)  # row -> its evaluation's JSON


def expert_chain(p: Planner, prefix: str, domain: str, load: str, *, stages: tuple[str, str, str],
                 general: bool = True, special: bool | None = None, steps_factor: float = 1.0,
                 label: str = "", rl: bool = True) -> list[str]:
    """[midtrain] -> sft -> [rlvr] of one domain; ``stages`` are the freeze policies used
    for (midtrain, sft, rl). Returns the job names, the last one is the expert."""
    s = p.s
    jobs = []
    cur = load
    if domain in D.MIDTRAIN_DOMAINS and s.midtrain_steps > 0:
        cur = p.train(f"{prefix}_midtrain", cur, stages[0], int(s.midtrain_steps * steps_factor), s.lr_midtrain,
                      p._datasets({domain: 1.0}, "text"), label=f"{label} midtrain")
        jobs.append(cur)
    weights = {domain: 0.5, D.GENERAL: 0.5} if general else {domain: 1.0}
    cur = p.train(f"{prefix}_sft", cur, stages[1], int(s.sft_steps * steps_factor), s.lr_sft, p._datasets(weights),
                  special=(domain == "tool_use") if special is None else special, label=f"{label} sft")
    jobs.append(cur)
    if domain in D.RL_DOMAINS and rl and s.rl_steps > 0:
        cur = p.rl(f"{prefix}_rl", cur, [domain], stages[2], label=f"{label} rlvr",
                   steps=int(s.rl_steps * steps_factor))
        jobs.append(cur)
    return jobs


def build_graph(s: DemoSettings, run: Path, graph: JobGraph, base_fn) -> Plan:
    p = Planner(s, run, graph)
    plan = Plan(p)
    doms = list(D.DOMAINS)
    all_sft = {d: 1.0 for d in (*doms, D.GENERAL)}

    graph.add(Job("base", fn=base_fn, cost=15, label="data, tokenizer, random tiny Olmo 2"))
    p.stages["base"] = None  # type: ignore[assignment]
    del p.stages["base"]
    # The base's two stages run alone (everything else depends on them): they get every
    # core the demo may use, a fixed count, so the run stays reproducible.
    pre = p.train("pretrain", "base", "full", s.pretrain_steps, s.lr_pretrain,
                  [{"path": str(p.data / "pretrain.jsonl"), "kind": "text", "weight": 1.0, "domain": "general"}],
                  deps=("base",), label="pretrain the base", threads=s.parallel)
    # The method branches from a fully post-trained model: the base also learns the chat
    # format and general instruction following (general SFT), never the domains.
    if s.base_sft_steps > 0:
        pre = p.train("base_sft", pre, "full", s.base_sft_steps, s.lr_sft, p._datasets({D.GENERAL: 1.0}),
                      label="post-train the base (general SFT)", threads=s.parallel)
    plan.rows["base"] = {"load": pre}
    p.tool("upcycle", "upcycle.py", ["--load", lambda: p.ckpt(pre), "--save", run / "models" / "upcycle"],
           deps=(pre,), label="upcycle to 2 experts")

    # -- BAR: one expert per domain, merge, router ------------------------------------
    bar_jobs = {}
    for d in doms:
        chain = expert_chain(p, f"bar_{d}", d, "upcycle", stages=("midtrain", "sft", "rlvr"), label=f"BAR {d}")
        bar_jobs[d] = chain
        plan.rows[f"expert: {d}"] = {"load": chain[-1]}
    plan.cost_groups["BAR"] = [j for c in bar_jobs.values() for j in c]
    n_exp = len(doms) + 1
    p.tool("merge", "merge_experts.py",
           ["--experts", *[(lambda d=d: f"{d}={p.ckpt(bar_jobs[d][-1])}") for d in doms],
            "--topk", str(n_exp), "--save", run / "models" / "merge"],
           deps=[c[-1] for c in bar_jobs.values()], label="merge experts")
    router = p.train("bar_router", "merge", "router", 0, s.lr_router, p._datasets(all_sft), deps=("merge",),
                     router_init=s.router_init, fraction=s.router_fraction, epochs=s.router_epochs,
                     label="BAR router")
    plan.cost_groups["BAR"].append(router)
    plan.router_job = router
    plan.rows["BAR"] = {"load": router}
    plan.rows[f"BAR, {n_exp - 1} of {n_exp} experts active"] = {"load": router, "topk": n_exp - 1}
    plan.export_job = p.tool("export", "convert_mcore_to_hf.py", ["--load", lambda: p.ckpt(router),
                                                                  "--save", run / "models" / "export_hf"],
                             deps=(router,), label="export to HF FlexOlmo")
    plan.rows["BAR (HF FlexOlmo export)"] = {"hf": run / "models" / "export_hf", "load": "export"}
    for d in D.RL_DOMAINS:
        plan.rl_runs[f"BAR {d}"] = bar_jobs[d][-1]

    # -- upgrade: a better code expert replaces the old one; only the router retrains --
    code_v2 = expert_chain(p, "bar_code_v2", "code", "upcycle", stages=("midtrain", "sft", "rlvr"),
                           steps_factor=s.upgrade_factor, label="code v2")
    plan.rl_runs["code v2"] = code_v2[-1]
    # The released model (router trained) is the base, and its router goes on training from
    # where it was: on the dev split this moved the domains whose experts had not changed
    # less than a router stage from a fresh init (README, "The demo").
    p.tool("merge_v2", "merge_experts.py",
           ["--base", lambda: p.ckpt(router), "--replace", lambda: f"code={p.ckpt(code_v2[-1])}",
            "--save", run / "models" / "merge_v2"], deps=(router, code_v2[-1]), label="replace code expert")
    router_v2 = p.train("bar_v2_router", "merge_v2", "router", 0, s.lr_router, p._datasets(all_sft),
                        deps=("merge_v2",), router_init="none", fraction=s.router_fraction,
                        epochs=s.router_epochs, label="router after upgrade")
    plan.rows["BAR + code v2 (upgrade)"] = {"load": router_v2}
    plan.cost_groups["upgrade code: BAR"] = [*code_v2, router_v2]

    # -- ablations ----------------------------------------------------------------------
    frozen = p.train("ablate_tool_frozen_emb", "upcycle", "midtrain", s.sft_steps, s.lr_sft,
                     p._datasets({"tool_use": 0.5, D.GENERAL: 0.5}), special=True,
                     label="tool use, frozen embeddings")
    plan.rows["expert: tool_use, frozen embeddings"] = {"load": frozen}
    only = p.train("ablate_safety_domain_only", "upcycle", "sft", s.sft_steps, s.lr_sft,
                   p._datasets({"safety": 1.0}), label="safety, no general data")
    plan.rows["expert: safety, domain data only"] = {"load": only}

    if s.baselines:
        # monolithic: the dense base, all data mixed, every parameter trained, same budget
        mono_jobs = []
        mono = pre
        if s.midtrain_steps > 0:
            mono = p.train("mono_midtrain", pre, "full", s.midtrain_steps * len(D.MIDTRAIN_DOMAINS), s.lr_midtrain,
                           p._datasets({d: 1.0 for d in D.MIDTRAIN_DOMAINS}, "text"), label="monolithic midtrain")
            mono_jobs.append(mono)
        mono_sft = p.train("mono_sft", mono, "full", s.sft_steps * len(doms), s.lr_sft,
                           p._datasets({**{d: 1.0 for d in doms}, D.GENERAL: float(len(doms))}), special=True,
                           label="monolithic sft")
        mono_jobs.append(mono_sft)
        if s.baseline_rl:
            mono_sft = p.rl("mono_rl", mono_sft, list(D.RL_DOMAINS), "full", steps=s.rl_steps * len(D.RL_DOMAINS),
                            label="monolithic rlvr")
            plan.rl_runs["monolithic"] = mono_sft
            mono_jobs.append(mono_sft)
        plan.rows["monolithic retraining"] = {"load": mono_sft}
        plan.cost_groups["monolithic retraining"] = mono_jobs
        # sequential: one domain after another on one dense model
        cur, seq_jobs = pre, []
        for d in doms:
            chain = expert_chain(p, f"seq_{d}", d, cur, stages=("full", "full", "full"), special=True,
                                 label=f"sequential {d}", rl=s.baseline_rl)
            seq_jobs += chain
            cur = chain[-1]
        plan.rows["sequential training"] = {"load": cur}
        plan.cost_groups["sequential training"] = seq_jobs
        # dense fine-tunes of the base, averaged (dense weight merging)
        dense = {}
        for d in doms:
            dense[d] = expert_chain(p, f"dense_{d}", d, pre, stages=("full", "full", "full"), special=True,
                                    label=f"dense {d}", rl=s.baseline_rl)
        plan.rows["dense weight merging"] = {"average": [c[-1] for c in dense.values()]}
        plan.cost_groups["dense weight merging"] = [j for c in dense.values() for j in c]
        # BTX-style: experts trained with no shared parameter kept (every stage trains all but
        # the anchor), composed by merging and routing
    if s.btx:
        btx = {}
        for d in doms:
            btx[d] = expert_chain(p, f"btx_{d}", d, "upcycle", stages=("rlvr", "rlvr", "rlvr"), label=f"BTX {d}")
        p.tool("btx_merge", "merge_experts.py",
               ["--experts", *[(lambda d=d: f"{d}={p.ckpt(btx[d][-1])}") for d in doms],
                "--topk", str(n_exp), "--save", run / "models" / "btx_merge"],
               deps=[c[-1] for c in btx.values()], label="BTX merge")
        btx_router = p.train("btx_router", "btx_merge", "router", 0, s.lr_router, p._datasets(all_sft),
                             deps=("btx_merge",), router_init=s.router_init, fraction=s.router_fraction,
                             epochs=s.router_epochs, label="BTX router")
        plan.rows["BTX (no shared params kept)"] = {"load": btx_router}
        plan.cost_groups["BTX"] = [j for c in btx.values() for j in c] + [btx_router]
    add_eval_jobs(plan)
    return plan


def add_eval_jobs(plan: Plan) -> None:
    """One evaluation step per row, ready as soon as its model is: rows are evaluated
    while other models still train, not all at the end."""
    p = plan.planner
    for row, spec in plan.rows.items():
        slug = re.sub(r"[^a-z0-9]+", "_", row.lower()).strip("_")
        out = p.run / "eval" / f"{slug}.json"
        plan.eval_files[row] = out
        deps = tuple(spec["average"]) if "average" in spec else (spec["load"],)

        def command(spec=spec, out=out):
            return python_module("megatron_bar.demo.report", "--row", json.dumps(_resolve_row(p, spec)),
                                 "--suites", p.data / "test", "--max-new-tokens", p.s.eval_max_new_tokens,
                                 "--out", out, "--score-cache", p.run / "eval" / "score_cache")

        p.graph.add(Job(f"eval_{slug}", command=command, deps=deps, cost=p.s.eval_cost,
                        label=f"evaluate {row}"))


def _resolve_row(p: Planner, spec: dict) -> dict:
    """A row spec with the pipeline's job names replaced by checkpoint folders."""
    if "hf" in spec:
        return {"hf": str(spec["hf"])}
    if "average" in spec:
        return {"average": [str(p.ckpt(j)) for j in spec["average"]]}
    return {"path": str(p.ckpt(spec["load"])), "topk": spec.get("topk")}


# -- running ---------------------------------------------------------------------------------

def _make_base(s: DemoSettings, run: Path) -> None:
    """Tokenizer (without the tool-call tokens), a random dense tiny Olmo 2, then the data
    (the base's pretraining text quotes its vocabulary's pieces)."""
    from megatron_bar.data.tokenizer import load_tokenizer
    from megatron_bar.demo.tiny import build_tiny_base

    tmp = run / "models" / ".base-build"
    if tmp.exists():
        shutil.rmtree(tmp)
    corpus = D.tokenizer_corpus(s.seed)
    paths = build_tiny_base(tmp, s.spec, seed=s.seed, corpus=corpus, with_moe=False)
    pieces = D.vocabulary_pieces(load_tokenizer(paths["dense"] / "tokenizer"))
    D.write_domain_data(run / "data", s.sizes, s.seed, pieces)
    paths["dense"].rename(run / "models" / "base")
    shutil.rmtree(tmp)


def run_demo(s: DemoSettings, out: Path, overwrite: bool = False, console=None, warm: bool = True) -> dict:
    """Run the whole demo into ``out``; returns the results dict (also results.json).
    ``warm``: steps run as forks of one interpreter that imported torch and megatron-core
    (:mod:`megatron_bar.demo.warm`), else each as a new interpreter; the results are the same."""
    from rich.console import Console

    from megatron_bar.demo import report

    console = console or Console()
    out = Path(out).resolve()
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite or another --out")
        shutil.rmtree(out)
    (out / "models").mkdir(parents=True)
    t0 = time.time()
    graph = JobGraph(out, REPO, parallel=s.parallel, console=console, warm=warm)
    plan = build_graph(s, out, graph, lambda: _make_base(s, out))
    p = plan.planner
    console.print(f"[bold]BAR demo[/bold] ({'quick' if s.quick else 'full'}, seed {s.seed}): "
                  f"{len(graph.jobs)} steps, {s.parallel} at a time -> {out}")
    seconds = graph.run()
    train_s = time.time() - t0
    console.print(f"training and evaluation done in {train_s / 60:.1f} min")

    from megatron_bar.data.tokenizer import load_tokenizer

    evaluated = {row: json.loads(path.read_text()) for row, path in plan.eval_files.items()}
    table = {row: e["scores"] for row, e in evaluated.items()}
    samples = {row: e["samples"] for row, e in evaluated.items()}
    changes = [e["topk_change"] for e in evaluated.values() if "topk_change" in e]
    claims = report.check_claims(table, changes[0] if changes else None)
    tokenizer = load_tokenizer(p.ckpt("pretrain") / "tokenizer")
    per_domain = {d: [j for j in plan.cost_groups["BAR"] if j.startswith(f"bar_{d}_")] for d in D.DOMAINS}
    cost = report.cost_table(plan.cost_groups, p.stages, tokenizer, per_domain, plan.router_job)
    plots = {
        "results.png": report.plot_table(table, out / "results.png"),
        "reward_curves.png": report.plot_rewards(
            {k: p.stages[j].output_dir / "metrics.jsonl" for k, j in plan.rl_runs.items()}, out / "reward_curves.png"),
        "router_heatmap.png": report.plot_router(p.stages[plan.router_job].output_dir / "router_stats.json",
                                                 out / "router_heatmap.png"),
    }
    result = {
        "settings": json.loads(json.dumps(asdict(s))),
        "columns": report.COLUMNS,
        "table": table,
        "claims": claims,
        "cost": cost,
        "plots": list(plots),
        "samples": samples,
        "timing": {"total_s": round(time.time() - t0, 1), "steps_s": {k: round(v, 1) for k, v in seconds.items()}},
    }
    report.write_atomic(out / "results.json", json.dumps(result, indent=1))
    report.write_atomic(out / "results.md", report.render_markdown(result))
    return result
