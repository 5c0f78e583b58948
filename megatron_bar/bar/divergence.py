"""The merge's divergence report: how far each input's shared parameters are from the
merged ones, per parameter group, and input tensors whose magnitude is far outside the
others' (a flipped exponent bit, a diverged run)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from megatron_bar.bar.roles import role_of

# An input tensor whose largest magnitude is this many times the other inputs' is reported.
OUTLIER_FACTOR = 100.0
_ORDER = ["embedding", "attention", "norms", "lm_head", "router (anchor row)", "other"]


def report_group(key: str) -> str:
    """The report's group of an averaged tensor (its role; the router's averaged row is
    the anchor's)."""
    group = role_of(key).group
    return "router (anchor row)" if group == "router" else group if group in _ORDER else "other"


@dataclass
class GroupStats:
    tensors: set = field(default_factory=set)
    params: int = 0
    averaged_params: int = 0
    max_abs: dict = field(default_factory=dict)  # input name -> max |x - merged|
    sq_dist: dict = field(default_factory=dict)  # input name -> sum of (x - merged)^2
    sq_norm: dict = field(default_factory=dict)  # input name -> sum of merged^2 where it is reported

    def add(self, name: str, sq_dist: float, sq_norm: float, max_abs: float) -> None:
        self.sq_dist[name] = self.sq_dist.get(name, 0.0) + sq_dist
        self.sq_norm[name] = self.sq_norm.get(name, 0.0) + sq_norm
        self.max_abs[name] = max(self.max_abs.get(name, 0.0), max_abs)

    def as_dict(self) -> dict:
        rel = {n: (math.sqrt(d / self.sq_norm[n]) if self.sq_norm[n] > 0 else (0.0 if d == 0 else math.inf))
               for n, d in self.sq_dist.items()}
        return {
            "tensors": len(self.tensors),
            "params": self.params,
            "averaged_params": self.averaged_params,
            "max_abs_diff": max(self.max_abs.values(), default=0.0),
            "max_abs_from_merged": dict(self.max_abs),
            "rel_l2_from_merged": rel,
        }


def outliers(max_abs: dict[str, dict[str, float]]) -> list[dict]:
    """``max_abs``: input name -> tensor -> its largest |value|. The tensors of an input
    whose largest magnitude is over OUTLIER_FACTOR times the other inputs' largest."""
    out = []
    for key in sorted(set().union(*max_abs.values())):
        tops = {name: m[key] for name, m in max_abs.items() if key in m}
        for name, top in tops.items():
            others = max((v for n, v in tops.items() if n != name), default=None)
            if others is not None and top > OUTLIER_FACTOR * others:
                out.append({"tensor": key, "input": name, "max_abs": top, "others_max_abs": others})
    return out


def _fmt(x: float) -> str:
    return "0" if x == 0 else str(x) if math.isinf(x) or math.isnan(x) else f"{x:.2e}"


def _count(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def format_divergence(divergence: dict, names: Sequence[str], found: Sequence[dict] = ()) -> str:
    """The divergence report as a table, one row per parameter group, then the outliers."""
    head = ["group", "params", "averaged", "max|x-m|"] + list(names)
    rows = [head]
    for group in sorted(divergence, key=lambda g: _ORDER.index(g) if g in _ORDER else 99):
        d = divergence[group]
        rel = d["rel_l2_from_merged"]
        rows.append([group, _count(d["params"]), _count(d["averaged_params"]), _fmt(d["max_abs_diff"])]
                    + [_fmt(rel[n]) if n in rel else "-" for n in names])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["divergence of the shared parameters from the merged ones m: max |x - m| over the "
             "inputs x, and per input ||x - m|| / ||m||"]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    for o in found:
        lines.append(f"outlier: {o['input']}'s tensor {o['tensor']!r} reaches |x| = {o['max_abs']:.3g}, the "
                     f"other inputs' at most {o['others_max_abs']:.3g} - check that checkpoint")
    return "\n".join(lines)
