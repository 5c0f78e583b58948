"""Where a merged BAR model loses against its experts: teacher-forced loss by routing.

    python examples/demo_routing_loss.py --run runs/tune --variant v0

For a run of ``examples/demo_tuning.py``, each domain's first ``--n`` SFT conversations are
scored (mean negative log-likelihood of the reply tokens, nats per token) by:

- ``expert``: the domain's own 2-expert model;
- ``merged_oracle``: the merge with only the anchor and that domain's expert active (its
  own router rows decide between them): what the merge's averaging alone costs;
- ``merged_all``: the merge, every expert active, before the router stage;
- ``routed_all``: after the router stage, every expert active (the BAR model);
- ``routed_oracle``: after the router stage, only the anchor and the domain's expert.
"""

import argparse
import json
from pathlib import Path

import torch

import megatron_bar
from megatron_bar.data import ChatTemplate, load_tokenizer, parse_chat_record
from megatron_bar.demo import domains as D


def _final(stage_dir: Path) -> Path:
    latest = stage_dir / "checkpoints" / "latest"
    return stage_dir / "checkpoints" / latest.read_text().strip()


@torch.no_grad()
def reply_nll(path: Path, records: list[dict], drop: list[str] | None = None) -> float:
    model = megatron_bar.load_model(path, drop_experts=drop)
    template = ChatTemplate(load_tokenizer(path / "tokenizer"))
    total, count = 0.0, 0
    for record in records:
        doc = template.encode(parse_chat_record(record))
        ids = torch.tensor([doc.tokens])
        logprobs = torch.log_softmax(model(ids)[0, :-1].float(), -1)
        targets = ids[0, 1:]
        mask = torch.tensor(doc.loss_mask[1:], dtype=torch.bool)
        total -= logprobs[torch.arange(len(targets)), targets][mask].sum().item()
        count += int(mask.sum())
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="an examples/demo_tuning.py --out folder")
    ap.add_argument("--variant", required=True)
    ap.add_argument("--n", type=int, default=40, help="SFT conversations per domain")
    a = ap.parse_args()
    merged = a.run / "models" / f"{a.variant}_merge"
    routed = _final(a.run / "stages" / f"{a.variant}_router")
    columns = ["expert", "merged_oracle", "merged_all", "routed_all", "routed_oracle"]
    print(f"| domain | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}")
    for domain in D.DOMAINS:
        lines = (a.run / "data" / "sft" / f"{domain}.jsonl").read_text().splitlines()[: a.n]
        records = [json.loads(line) for line in lines]
        others = [d for d in D.DOMAINS if d != domain]
        row = [reply_nll(_final(a.run / "stages" / f"{a.variant}_{domain}_sft"), records),
               reply_nll(merged, records, others), reply_nll(merged, records),
               reply_nll(routed, records), reply_nll(routed, records, others)]
        print(f"| {domain} | " + " | ".join(f"{x:.3f}" for x in row) + " |", flush=True)


if __name__ == "__main__":
    main()
