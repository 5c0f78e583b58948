"""Reward functions, the registry, and safe_reward."""

import concurrent.futures
import logging
import textwrap

import pytest

from megatron_bar.rl.rewards import (
    BUILTIN_REWARDS,
    RewardPool,
    code_reward,
    extract_program,
    get_reward_fn,
    math_reward,
    safe_reward,
    safety_reward,
    tool_reward,
)
from megatron_bar.rl.sandbox import SandboxConfig

# ---------------------------------------------------------------------- math


@pytest.mark.parametrize(
    "answer, completion",
    [
        ("42", "Adding them up gives \\boxed{42}."),
        ("0.5", "So the probability is $\\boxed{\\frac{1}{2}}$."),
        ("1/2", "The answer is 0.5"),
        ("\\frac{1}{2}", "Hence \\boxed{0.5}"),
        ("x^2+1", "We get $\\boxed{1 + x^2}$"),
        ("42", "First I tried 17, which fails; the final answer is 42"),
    ],
)
def test_math_reward_accepts_equivalent_answers(answer, completion):
    assert math_reward({"answer": answer}, completion) == 1.0


@pytest.mark.parametrize(
    "answer, completion",
    [
        ("42", "Adding them up gives \\boxed{43}."),
        ("0.5", "The answer is \\boxed{\\frac{1}{3}}"),
        ("42", "I considered 42, but the answer is \\boxed{17}"),  # the final answer counts
        ("42", "I don't know."),
    ],
)
def test_math_reward_rejects_wrong_answers(answer, completion):
    assert math_reward({"answer": answer}, completion) == 0.0


def test_math_reward_from_a_worker_thread_is_not_a_silent_zero():
    records = [({"answer": "0.5"}, "so \\boxed{\\frac{1}{2}}"), ({"answer": "7"}, "so \\boxed{8}")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        rewards = list(pool.map(lambda rc: math_reward(*rc), records))
    assert rewards == [1.0, 0.0]


# ---------------------------------------------------------------------- code

ADD_TESTS = [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "10 -4\n", "stdout": "6"}]


def _fenced(program: str, lang: str = "python") -> str:
    return f"Here is my solution.\n```{lang}\n{textwrap.dedent(program).strip()}\n```\nDone."


def test_code_reward_passes_all_tests():
    completion = _fenced("a, b = map(int, input().split())\nprint(a + b)   ")
    assert code_reward({"tests": ADD_TESTS}, completion) == 1.0


def test_code_reward_whole_text_when_unfenced():
    assert code_reward({"tests": ADD_TESTS}, "a, b = map(int, input().split())\nprint(a + b)\n") == 1.0


def test_code_reward_is_all_or_nothing():
    # Right on the first test only: hard-codes the sample output.
    assert code_reward({"tests": ADD_TESTS}, _fenced("print(3)")) == 0.0


@pytest.mark.parametrize(
    "program",
    [
        "a, b = map(int, input().split())\nprint(a - b)",  # wrong answer
        "raise SystemExit(1)",  # runtime failure
        "while True:\n    pass",  # timeout
    ],
)
def test_code_reward_failures_score_zero(program):
    assert code_reward({"tests": ADD_TESTS, "timeout_s": 1.0}, _fenced(program)) == 0.0


def _count_sandbox_runs(monkeypatch) -> list[str]:
    import megatron_bar.rl.rewards as rewards

    real, runs = rewards.run_python, []

    def counted(program, stdin="", **kw):
        runs.append(program)
        return real(program, stdin, **kw)

    monkeypatch.setattr(rewards, "run_python", counted)
    rewards._passes_tests.cache_clear()
    return runs


def test_code_reward_unparsable_program_scores_zero_without_running(monkeypatch):
    runs = _count_sandbox_runs(monkeypatch)
    assert code_reward({"tests": ADD_TESTS}, _fenced("print(1 +")) == 0.0
    assert code_reward({"tests": ADD_TESTS}, _fenced("def f(:\n    return")) == 0.0
    assert runs == []
    # one that parses but fails at run time still runs, and still scores zero
    assert code_reward({"tests": ADD_TESTS}, _fenced("print(undefined_name)")) == 0.0
    assert len(runs) == 1


def test_code_reward_same_program_same_tests_runs_once(monkeypatch):
    runs = _count_sandbox_runs(monkeypatch)
    good = _fenced("a, b = map(int, input().split())\nprint(a + b)")
    assert [code_reward({"tests": ADD_TESTS}, good) for _ in range(3)] == [1.0, 1.0, 1.0]
    assert len(runs) == len(ADD_TESTS)
    # other tests for the same program: its verdict is not reused
    assert code_reward({"tests": [{"stdin": "1 2\n", "stdout": "4\n"}]}, good) == 0.0
    assert len(runs) == len(ADD_TESTS) + 1


def test_code_reward_without_tests_is_an_error():
    with pytest.raises(ValueError, match="no tests"):
        code_reward({"tests": []}, "print(1)")


def test_extract_program_takes_the_last_python_block():
    completion = "Draft:\n```python\nprint('draft')\n```\nFinal:\n```py\nprint('final')\n```\n"
    assert extract_program(completion) == "print('final')\n"
    assert extract_program("no fences here") == "no fences here"


# ------------------------------------------------------------------ tool use

WEATHER = {"call": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "metric": True}}}


def test_tool_reward_exact_call_matches_regardless_of_key_order():
    completion = 'Sure.\n<tool_call>\n{"arguments": {"metric": true, "days": 3.0, "city": "Paris"}, "name": "get_weather"}\n</tool_call>'
    assert tool_reward(WEATHER, completion) == 1.0


def test_tool_reward_arguments_may_be_a_json_string():
    record = {"call": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3, "metric": true}'}}
    completion = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "metric": true}}</tool_call>'
    assert tool_reward(record, completion) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon", "days": 3, "metric": true}}</tool_call>',
        '<tool_call>{"name": "get_forecast", "arguments": {"city": "Paris", "days": 3, "metric": true}}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "metric": 1}}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "metric": true}</tool_call>',
        'get_weather(city="Paris", days=3, metric=True)',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "metric": true}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "metric": true}}</tool_call>',
    ],
    ids=["wrong-arg", "wrong-name", "bool-vs-int", "missing-arg", "bad-json", "no-tags", "two-calls"],
)
def test_tool_reward_rejects_anything_but_the_one_exact_call(completion):
    assert tool_reward(WEATHER, completion) == 0.0


# -------------------------------------------------------------------- safety


@pytest.mark.parametrize(
    "behavior, completion, expected",
    [
        ("refuse", "I can't help with making explosives.", 1.0),
        ("refuse", "I\u2019m sorry, but I won\u2019t do that.", 1.0),
        ("refuse", "Sure! Step one: acquire the precursors...", 0.0),
        ("comply", "Here is a recipe for banana bread: ...", 1.0),
        ("comply", "I cannot assist with baking questions.", 0.0),
    ],
)
def test_safety_reward(behavior, completion, expected):
    assert safety_reward({"behavior": behavior}, completion) == expected


def test_safety_reward_only_looks_at_the_opening():
    completion = "Here is the recipe. " + "Mix well. " * 40 + "I can't stress enough how easy it is."
    assert safety_reward({"behavior": "comply"}, completion) == 1.0


def test_safety_reward_rejects_unknown_behavior():
    with pytest.raises(ValueError, match="behavior"):
        safety_reward({"behavior": "maybe"}, "ok")


# ------------------------------------------------------------------ registry


def test_registry_builtins():
    assert get_reward_fn("math") is math_reward
    assert get_reward_fn("code") is code_reward
    assert get_reward_fn("tool_use") is tool_reward
    assert get_reward_fn("safety") is safety_reward
    assert set(BUILTIN_REWARDS) == {"math", "code", "tool_use", "safety"}


def test_registry_user_function(tmp_path, monkeypatch):
    package = tmp_path / "my_rewards_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text("def length_reward(record, completion):\n    return len(completion) / 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_reward_fn("my_rewards_pkg.scoring:length_reward")
    assert fn({}, "abcde") == 0.5


@pytest.mark.parametrize(
    "name, message",
    [
        ("maths", "unknown reward 'maths'"),
        ("no_such_pkg_9f2.mod:fn", "cannot import module 'no_such_pkg_9f2.mod'"),
        ("json:no_such_function", "module 'json' has no attribute 'no_such_function'"),
    ],
)
def test_registry_errors_name_what_was_not_found(name, message):
    with pytest.raises(ValueError, match=message):
        get_reward_fn(name)


def test_registry_rejects_non_callables():
    with pytest.raises(ValueError, match="not a function"):
        get_reward_fn("json:__version__")


# --------------------------------------------------------------- safe_reward


def test_safe_reward_turns_an_exception_into_zero_and_logs_it(caplog):
    def broken(record, completion):
        raise RuntimeError("verifier exploded")

    long_completion = "x" * 10_000
    with caplog.at_level(logging.WARNING, logger="megatron_bar.rl.rewards"):
        reward, error = safe_reward(broken, {"id": 7}, long_completion)
    assert reward == 0.0
    assert error == "RuntimeError: verifier exploded"
    (log,) = caplog.records
    assert "verifier exploded" in log.getMessage() and "{'id': 7}" in log.getMessage()
    assert len(log.getMessage()) < 2000  # the sample is truncated


def test_safe_reward_rejects_non_finite_rewards():
    reward, error = safe_reward(lambda r, c: float("nan"), {}, "")
    assert reward == 0.0 and "not finite" in error


def test_safe_reward_passes_results_through():
    assert safe_reward(safety_reward, {"behavior": "refuse"}, "Sorry, no.") == (1.0, None)


def test_safe_reward_counts_a_bad_record_as_an_error():
    reward, error = safe_reward(math_reward, {"question": "no answer field"}, "\\boxed{1}")
    assert reward == 0.0 and error.startswith("KeyError")


# ----------------------------------------------------------------- the pool


def test_code_reward_scores_a_program_that_uses_subprocess():
    program = "import subprocess, sys\na, b = map(int, input().split())\n" \
              "print(subprocess.run([sys.executable, '-c', f'print({a} + {b})'], capture_output=True, text=True).stdout, end='')"
    assert code_reward({"tests": ADD_TESTS}, _fenced(program)) == 1.0


def _raises(record, completion):
    raise ValueError("boom")


def test_reward_pool_scores_in_workers_like_in_process():
    good = _fenced("a, b = map(int, input().split())\nprint(a + b)")
    jobs = [
        (code_reward, {"tests": ADD_TESTS}, good),
        (code_reward, {"tests": ADD_TESTS}, _fenced("print(0)")),
        (math_reward, {"answer": "42"}, "so \\boxed{42}"),
        (_raises, {}, "x"),
        (safety_reward, {"behavior": "refuse"}, "Sure!"),
    ]
    with RewardPool(2) as pool:
        pooled = pool.score(jobs)
    assert pooled == RewardPool(0).score(jobs)
    assert [value for value, _ in pooled] == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert pooled[3][1] == "ValueError: boom" and [e for _, e in pooled].count(None) == 4


def test_reward_pool_workers_get_the_sandbox_setting(tmp_path):
    # No bubblewrap at that path: each worker refuses code, naming the setting to change.
    with RewardPool(1, SandboxConfig(bwrap=str(tmp_path / "missing"))) as pool:
        (value, error), = pool.score([(code_reward, {"tests": ADD_TESTS}, "print(3)")])
    assert value == 0.0 and "SandboxUnavailable" in error and "rl.sandbox.allow_unisolated: true" in error


def test_reward_pool_a_dead_worker_costs_its_jobs_not_the_run():
    jobs = [(safety_reward, {"behavior": "comply"}, "Sure!"), (_exit_worker, {}, "x")]
    with RewardPool(1) as pool:
        scored = pool.score(jobs)
        assert scored[1][0] == 0.0 and "BrokenProcessPool" in scored[1][1]
        assert pool.score(jobs[:1]) == [(1.0, None)]  # a fresh pool afterwards


def _exit_worker(record, completion):
    import os

    os._exit(3)
