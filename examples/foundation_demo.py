#!/usr/bin/env python
"""The foundation of BAR on a tiny model, on CPU, through the same tools a cluster runs.

  random tiny Olmo 2 (transformers) --convert_hf_to_mcore--> megatron checkpoint
      --upcycle--> 2-expert BAR MoE (expert 0 = anchor) --convert_mcore_to_hf--> FlexOlmo

and checks every hop against transformers: the table shows the largest logit difference.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import warnings

import torch

REPO = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore")


def tool(name, *args):
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr}")
    print(f"  {name:<24} {proc.stdout.strip()}  ({time.time() - t0:.1f}s)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None, help="keep outputs here (default: temp)")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, Olmo2Config, Olmo2ForCausalLM

    import megatron_bar

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bar-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = Olmo2Config(vocab_size=1001, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         pad_token_id=1, eos_token_id=2, max_position_embeddings=512)
    dense_hf = Olmo2ForCausalLM(config).eval()
    dense_hf.save_pretrained(work / "hf-dense")
    print(f"workdir {work}")
    tool("convert_hf_to_mcore.py", "--hf-dir", work / "hf-dense", "--save", work / "mcore-dense")
    tool("upcycle.py", "--load", work / "mcore-dense", "--save", work / "mcore-bar2")
    tool("convert_mcore_to_hf.py", "--load", work / "mcore-bar2", "--save", work / "hf-bar2")

    tokens = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = dense_hf(tokens).logits
        rows = [
            ("megatron dense vs transformers Olmo2", megatron_bar.load_model(work / "mcore-dense")(tokens)),
            ("megatron BAR 2-expert vs dense", megatron_bar.load_model(work / "mcore-bar2")(tokens)),
            ("exported FlexOlmo (transformers) vs dense",
             AutoModelForCausalLM.from_pretrained(work / "hf-bar2").eval()(tokens).logits),
        ]
    print("\n| check | max abs logit diff |\n|---|---|")
    worst = 0.0
    for name, logits in rows:
        diff = (logits - reference).abs().max().item()
        worst = max(worst, diff)
        print(f"| {name} | {diff:.2e} |")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
