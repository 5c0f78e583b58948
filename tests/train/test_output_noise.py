"""What the tools print: throughput with units that fit its size, and dependency warnings
silenced by exact message only."""

import warnings

from megatron_bar.train.metrics import format_rate
from megatron_bar.utils.quiet import DEPENDENCY_WARNINGS, quiet_dependency_warnings


def test_rates_keep_three_digits_at_any_scale():
    assert format_rate(12.3, "tok/s") == "12.3 tok/s"  # not "0.0k tok/s"
    assert format_rate(512, "tok/s") == "512 tok/s"
    assert format_rate(12_345, "tok/s") == "12.3k tok/s"
    assert format_rate(1.25e6, "tok/s") == "1.25M tok/s"


def test_only_the_named_warnings_are_silenced():
    category, message = DEPENDENCY_WARNINGS[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_dependency_warnings()
        warnings.warn(message, category)
        warnings.warn(message + " (reworded)", category)
        warnings.warn("another deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == [message + " (reworded)", "another deprecation"]
