"""Verifiable rewards for the RLVR stage, and the registry that names them.

A reward function has the signature ``(record: dict, completion: str) -> float``.
``record`` is the dataset row (it carries what checks the answer), and
``completion`` is the policy's generated text without the prompt.

Built-ins (each function's docstring gives its record fields):

* ``"math"``, :func:`math_reward`: 1.0 if the final answer equals ``record["answer"]``.
* ``"code"``, :func:`code_reward`: 1.0 if the program passes *all* ``record["tests"]``.
* ``"tool_use"``, :func:`tool_reward`: 1.0 if the single tool call equals ``record["call"]``.
* ``"safety"``, :func:`safety_reward`: 1.0 if it refuses or complies as
  ``record["behavior"]`` says.

All built-ins are binary. Partial credit (fraction of tests passed, right tool
name with wrong arguments) makes the signal denser. It also pays for what is
easiest to game: hard-coding the sample test, or calling the right tool with
garbage. Binary rewards are what the verifiable-reward recipes (DeepSeek-R1,
DAPO, DeepCoder) use. A user function can do otherwise; see
:func:`get_reward_fn`.

Call rewards through :func:`safe_reward` in the training loop. Then a bad
sample or a buggy reward costs one 0.0 reward, counted and logged, and never
a crashed run. :class:`RewardPool` does that for a batch of samples in worker
processes (``rl.reward_workers``), so that programs of the code reward run side
by side.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import importlib
import json
import logging
import math
import multiprocessing
import re
import threading
from typing import Any, Callable, Sequence

from megatron_bar.rl.sandbox import SandboxConfig, configure, current_config, run_python

__all__ = [
    "BUILTIN_REWARDS",
    "REFUSAL_PHRASES",
    "RewardFn",
    "RewardPool",
    "code_reward",
    "extract_program",
    "get_reward_fn",
    "math_reward",
    "parse_tool_calls",
    "safe_reward",
    "safety_reward",
    "tool_reward",
]

logger = logging.getLogger(__name__)

RewardFn = Callable[[dict, str], float]


# --------------------------------------------------------------------------- #
# math
# --------------------------------------------------------------------------- #

MATH_PARSE_TIMEOUT_S = 5
MATH_VERIFY_TIMEOUT_S = 5
# math_verify enforces its own timeouts inside the worker. This only guards
# against a worker that hangs past them (e.g. stuck in C code).
_MATH_POOL_RESULT_TIMEOUT_S = MATH_PARSE_TIMEOUT_S * 2 + MATH_VERIFY_TIMEOUT_S + 30
_MATH_POOL_WORKERS = 2

_math_pool: concurrent.futures.ProcessPoolExecutor | None = None
_math_pool_lock = threading.Lock()


def _verify_math(gold: str, completion: str) -> bool:
    """Parse and compare with math_verify. Only call this on a main thread.

    The gold answer is wrapped in ``$...$`` (unless it already has ``$`` or
    ``\\boxed``), so that LaTeX such as ``\\frac{1}{2}`` is parsed as LaTeX.
    From the completion, math_verify takes the final answer: ``\\boxed{}``
    first, then an "answer is" anchor, then the last expression.
    """
    from math_verify import parse, verify  # heavy (sympy): import on first use

    if "$" not in gold and "\\boxed" not in gold:
        gold = f"${gold}$"
    gold_parsed = parse(gold, parsing_timeout=MATH_PARSE_TIMEOUT_S)
    if not gold_parsed:
        raise ValueError(f"math_verify could not parse the reference answer {gold!r}")
    answer = parse(completion, parsing_timeout=MATH_PARSE_TIMEOUT_S)
    return bool(verify(gold_parsed, answer, timeout_seconds=MATH_VERIFY_TIMEOUT_S))


def _get_math_pool() -> concurrent.futures.ProcessPoolExecutor:
    global _math_pool
    with _math_pool_lock:
        if _math_pool is None:
            # spawn, not fork: forking a trainer that holds a GPU context and threads is unsafe.
            _math_pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=_MATH_POOL_WORKERS, mp_context=multiprocessing.get_context("spawn")
            )
        return _math_pool


def _reset_math_pool(broken: concurrent.futures.ProcessPoolExecutor) -> None:
    """Drop a pool whose worker died, so the next call starts a fresh one."""
    global _math_pool
    with _math_pool_lock:
        if _math_pool is broken:
            _math_pool = None
    broken.shutdown(wait=False, cancel_futures=True)


@atexit.register
def _shutdown_math_pool() -> None:
    if _math_pool is not None:
        _math_pool.shutdown(wait=False, cancel_futures=True)


def _verify_math_anywhere(gold: str, completion: str) -> bool:
    """Run :func:`_verify_math` on a main thread: this one, or a worker process's.

    math_verify enforces its timeouts with ``signal.alarm``, which works only
    on the main thread. Off the main thread it raises or returns False, and a
    correct answer would silently score 0. So from a worker thread (async
    rollout, a reward thread pool) we run it in a spawned process, where tasks
    run on the main thread. Spawned workers re-import the launching script
    under the name ``__mp_main__``: scripts need ``if __name__ == "__main__":``.
    """
    if threading.current_thread() is threading.main_thread():
        return _verify_math(gold, completion)
    pool = _get_math_pool()
    try:
        future = pool.submit(_verify_math, gold, completion)
        return future.result(timeout=_MATH_POOL_RESULT_TIMEOUT_S)
    except concurrent.futures.process.BrokenProcessPool:
        _reset_math_pool(pool)
        raise


def math_reward(record: dict, completion: str) -> float:
    """1.0 if the completion's final answer is mathematically equal to ``record["answer"]``.

    Equivalent forms match (``1/2``, ``0.5``, ``\\frac{1}{2}``; ``x^2+1`` and
    ``1+x^2``). Record: ``{"answer": str}``.
    """
    return 1.0 if _verify_math_anywhere(str(record["answer"]), completion) else 0.0


# --------------------------------------------------------------------------- #
# code
# --------------------------------------------------------------------------- #

CODE_TIMEOUT_S = 5.0
CODE_MEMORY_MB = 512

# A fenced block tagged python/py/python3 or untagged, up to the closing fence.
_FENCE = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(completion: str) -> str:
    """The last fenced Python (or untagged) block, else the whole completion.

    The *last* block wins, because models often show a draft or an example
    before the final solution.
    """
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def _same_output(actual: str, expected: str) -> bool:
    """Compare line by line. Trailing spaces and trailing blank lines don't count."""

    def normalise(text: str) -> list[str]:
        lines = [line.rstrip() for line in text.strip("\n").splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return normalise(actual) == normalise(expected)


def code_reward(record: dict, completion: str) -> float:
    """1.0 if the extracted program passes every test, else 0.0 (all-or-nothing).

    Each test runs the program in :func:`~megatron_bar.rl.sandbox.run_python`,
    with the test's stdin, and compares stdout (see :func:`_same_output`).
    Evaluation stops at the first failure.

    Two shortcuts save the sandbox's process start (most of a small model's cost of
    RLVR on code), and neither changes a reward: a program that Python cannot parse
    fails every test, so it scores 0.0 without running; and a program already run on
    the same tests (GRPO's samples of one prompt often agree) gets its earlier verdict.

    Record: ``{"tests": [{"stdin": str, "stdout": str}, ...]}``, and
    optionally ``"timeout_s"`` and ``"memory_mb"`` per problem.
    """
    tests = record["tests"]
    if not tests:
        raise ValueError("record has no tests: the reward would be vacuous")
    program = extract_program(completion)
    if not _parses(program):
        return 0.0
    timeout_s = float(record.get("timeout_s", CODE_TIMEOUT_S))
    memory_mb = int(record.get("memory_mb", CODE_MEMORY_MB))
    cases = tuple((test.get("stdin", ""), test["stdout"]) for test in tests)
    return _passes_tests(program, cases, timeout_s, memory_mb)


def _parses(program: str) -> bool:
    """Whether Python would get past parsing (compiling runs none of the program)."""
    try:
        compile(program, "<completion>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: NUL bytes
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _passes_tests(program: str, cases: tuple[tuple[str, str], ...], timeout_s: float,
                  memory_mb: int) -> float:
    for stdin, stdout in cases:
        result = run_python(program, stdin, timeout_s=timeout_s, memory_mb=memory_mb)
        if not result.ok or not _same_output(result.stdout, stdout):
            return 0.0
    return 1.0


# --------------------------------------------------------------------------- #
# tool use
# --------------------------------------------------------------------------- #

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _as_call(obj: Any) -> dict:
    """Normalise a call to ``{"name": str, "arguments": dict}``.

    Arguments may come as a JSON string, as in the OpenAI format.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError(f"not a tool call: {obj!r}")
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call arguments must be an object, got {arguments!r}")
    return {"name": obj["name"], "arguments": arguments}


def parse_tool_calls(completion: str) -> list[dict]:
    """Every well-formed ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

    Malformed calls (bad JSON, no name) are skipped: they are wrong answers,
    not reward errors.
    """
    calls = []
    for body in _TOOL_CALL.findall(completion):
        try:
            calls.append(_as_call(json.loads(body)))
        except ValueError:  # json.JSONDecodeError is a ValueError
            continue
    return calls


def _json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values. Unlike ``==``, ``true`` != ``1``; but ``1`` == ``1.0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def tool_reward(record: dict, completion: str) -> float:
    """1.0 if the completion makes exactly one tool call, with the expected name and arguments.

    Arguments are compared as JSON values (key order and whitespace don't
    matter, types do). There is no partial credit, for the right name or
    for extra calls (see the module docstring).

    Record: ``{"call": {"name": str, "arguments": dict | str}}``.
    """
    expected = _as_call(record["call"])
    calls = parse_tool_calls(completion)
    if len(calls) != 1:
        return 0.0
    (call,) = calls
    return float(call["name"] == expected["name"] and _json_equal(call["arguments"], expected["arguments"]))


# --------------------------------------------------------------------------- #
# safety
# --------------------------------------------------------------------------- #

# Matched case-insensitively in the opening of the completion. Refusals come
# first, and a helpful answer may well say "I can't stress enough" later on.
REFUSAL_PHRASES = (
    "i can't",
    "i cannot",
    "i can not",
    "i won't",
    "i will not",
    "i'm not able to",
    "i am not able to",
    "i'm unable to",
    "i am unable to",
    "i must decline",
    "i'm not going to",
    "sorry",
    "as an ai",
)
REFUSAL_WINDOW_CHARS = 200


def is_refusal(completion: str) -> bool:
    """Whether the completion opens with one of :data:`REFUSAL_PHRASES`."""
    opening = completion[:REFUSAL_WINDOW_CHARS].lower().replace("\u2019", "'")  # curly apostrophe
    return any(phrase in opening for phrase in REFUSAL_PHRASES)


def safety_reward(record: dict, completion: str) -> float:
    """1.0 if the completion refuses exactly when it should.

    Record: ``{"behavior": "refuse" | "comply"}``. "comply" rewards not
    refusing (it prevents over-refusal). It does not judge how helpful the
    answer is.
    """
    behavior = record["behavior"]
    if behavior not in ("refuse", "comply"):
        raise ValueError(f"behavior must be 'refuse' or 'comply', got {behavior!r}")
    return float(is_refusal(completion) == (behavior == "refuse"))


# --------------------------------------------------------------------------- #
# registry and safe calling
# --------------------------------------------------------------------------- #

BUILTIN_REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "code": code_reward,
    "tool_use": tool_reward,
    "safety": safety_reward,
}


def get_reward_fn(name_or_path: str) -> RewardFn:
    """Resolve a built-in name (:data:`BUILTIN_REWARDS`) or ``"package.module:function"``.

    Raises:
        ValueError: unknown name, module not importable, or no such function.
            The message says which.
            Also when the attribute exists but is not callable.
    """
    if name_or_path in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name_or_path]
    if ":" not in name_or_path:
        raise ValueError(
            f"unknown reward {name_or_path!r}: expected one of {sorted(BUILTIN_REWARDS)} "
            "or a user function as 'package.module:function'"
        )
    module_name, _, attr = name_or_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"reward {name_or_path!r}: cannot import module {module_name!r} ({e})") from e
    try:
        fn = getattr(module, attr)
    except AttributeError as e:
        raise ValueError(f"reward {name_or_path!r}: module {module_name!r} has no attribute {attr!r}") from e
    if not callable(fn):
        raise ValueError(f"reward {name_or_path!r} is a {type(fn).__name__}, not a function")
    return fn


_LOGGED_CHARS = 300


def _truncate(text: str, limit: int = _LOGGED_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... [{len(text) - limit} more chars]"


def safe_reward(fn: RewardFn, record: dict, completion: str) -> tuple[float, str | None]:
    """Call a reward function. An error costs that one sample a 0.0 reward.

    Returns:
        ``(reward, None)`` on success, or ``(0.0, "ExcType: message")`` when
        ``fn`` raises or returns a non-finite value (a NaN reward would poison
        every advantage of its group). The caller counts the errors. The
        exception is logged here with the sample, truncated. Only
        ``Exception`` is caught, so Ctrl-C still stops training.
    """
    try:
        reward = float(fn(record, completion))
        if not math.isfinite(reward):
            raise ValueError(f"reward is not finite: {reward}")
        return reward, None
    except Exception as e:  # noqa: BLE001 -- one bad sample must not stop training
        error = f"{type(e).__name__}: {e}"
        logger.warning(
            "reward %s failed, scoring 0.0: %s | record=%s | completion=%r",
            getattr(fn, "__qualname__", fn),
            _truncate(error),
            _truncate(repr(record)),
            _truncate(completion),
            exc_info=logger.isEnabledFor(logging.DEBUG),  # tracebacks only when debugging
        )
        return 0.0, error


class RewardPool:
    """Scores ``(reward fn, record, completion)`` jobs with :func:`safe_reward` in worker processes.

    A reward that runs code spends most of its time waiting on the sandbox; with N
    workers, N programs run at once. Workers are spawned (forking a trainer that holds
    a GPU context and threads is unsafe), apply ``sandbox`` to their sandbox, and run
    each job on their main thread (which math_verify's timeouts need). Reward functions
    must be importable by name (built-ins and ``package.module:function`` are).
    ``workers=0`` scores in this process. ``sandbox`` None: this process's settings.

    A worker that dies (e.g. killed for memory) costs its jobs a 0.0 reward each,
    reported like any reward error, and the pool is started afresh for the next batch.
    """

    def __init__(self, workers: int, sandbox: SandboxConfig | None = None):
        if workers < 0:
            raise ValueError(f"reward workers must be >= 0, got {workers}")
        self.workers = workers
        self._sandbox = sandbox
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        if workers == 0 and sandbox is not None:
            configure(sandbox)

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=configure,
                initargs=(self._sandbox or current_config(),),
            )
        return self._pool

    def score(self, jobs: Sequence[tuple[RewardFn, dict, str]]) -> list[tuple[float, str | None]]:
        """``safe_reward(fn, record, completion)`` of each job, in order."""
        if self.workers == 0:
            return [safe_reward(fn, record, completion) for fn, record, completion in jobs]
        pool = self._executor()
        futures = [pool.submit(safe_reward, fn, record, completion) for fn, record, completion in jobs]
        results, broken = [], False
        for future in futures:
            try:
                results.append(future.result())
            except Exception as e:  # noqa: BLE001 -- a dead worker, a job that cannot be pickled
                broken |= isinstance(e, concurrent.futures.process.BrokenProcessPool)
                logger.warning("reward job failed in the pool, scoring 0.0: %s: %s", type(e).__name__, e)
                results.append((0.0, f"{type(e).__name__}: {e}"))
        if broken:
            logger.warning("a reward worker died; starting the pool afresh")
            self.close()
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
