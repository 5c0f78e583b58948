"""Evaluation of a causal LM on held-out domain suites: greedy decoding, verifiable scorers.

    from megatron_bar.eval import evaluate, load_suites
    scores = evaluate(model, tokenizer, load_suites("runs/demo/data/test"))
    # {"math": 42.0, "code": 10.0, ..., "general": 61.5, "overall": 30.2}

See :func:`evaluate` and :func:`load_suites` for the interface and the test-prompt format.
"""

from megatron_bar.eval.generate import greedy_generate
from megatron_bar.eval.runner import EvalResult, evaluate, evaluate_detailed
from megatron_bar.eval.scorers import SCORERS, get_scorer
from megatron_bar.eval.suites import SuiteError, TestPrompt, load_suites, write_suite

__all__ = [
    "EvalResult",
    "SCORERS",
    "SuiteError",
    "TestPrompt",
    "evaluate",
    "evaluate_detailed",
    "get_scorer",
    "greedy_generate",
    "load_suites",
    "write_suite",
]
