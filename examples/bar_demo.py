#!/usr/bin/env python
"""The BAR demo: the whole pipeline on a tiny model on CPU, with baselines and ablations.

    python examples/bar_demo.py                # full demo (under 45 min on 2 cores)
    python examples/bar_demo.py --quick        # a smaller version (a few minutes)

Writes results.md, results.json and PNG plots to --out and prints the table. The logic
lives in megatron_bar/demo/pipeline.py.
"""

import argparse
import sys
import warnings
from pathlib import Path

from megatron_bar.cli import run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller data, model and budgets (for tests)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/bar_demo[_quick])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--parallel", type=int, default=2, help="steps run at the same time (one core each)")
    p.add_argument("--no-baselines", action="store_true", help="skip monolithic, sequential, dense merge, BTX")
    p.add_argument("--cold", action="store_true",
                   help="start every step as a new interpreter (default: forks of one that imported torch once)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    from dataclasses import replace

    from megatron_bar.demo.pipeline import DemoSettings, run_demo

    s = replace(DemoSettings.preset(args.quick, args.seed), parallel=args.parallel,
                baselines=not args.no_baselines)
    out = args.out or Path("runs") / ("bar_demo_quick" if args.quick else "bar_demo")
    result = run_demo(s, out, overwrite=args.overwrite, warm=not args.cold)
    print((out / "results.md").read_text())
    sys.stdout.flush()


if __name__ == "__main__":
    run(main)
