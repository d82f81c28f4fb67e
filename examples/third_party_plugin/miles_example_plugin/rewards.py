"""The ``exact_number`` reward: 1 when the last number in the response equals the numeric label.

Registered under the ``miles.rewards`` entry-point group, so ``--rm-type exact_number`` selects it once the
package is installed. ``--exact-number-tolerance`` (added by this package's plugin) allows a margin.
"""

from __future__ import annotations

import argparse
import math
import re

from miles_core import Sample, UsageError

# A number as people write it: optional sign, thousands commas, decimals ("-1,234.5", "42", ".5").
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> float | None:
    """The value of the last number written in ``text``, or ``None`` if it has none."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


async def exact_number(args: argparse.Namespace, sample: Sample) -> float:
    """``1.0`` if the response's last number equals ``sample.label`` (within the tolerance), else ``0.0``.

    What was parsed is kept in ``sample.metadata["exact_number_pred"]`` so a zero can be explained.
    """
    try:
        gold = float(str(sample.label).replace(",", ""))
    except ValueError:
        # The core catches this, marks the sample FAILED and logs the sentence; the run goes on.
        raise UsageError(f"exact_number needs a numeric label, got {sample.label!r}; fix the data.") from None
    pred = last_number(sample.response or "")
    sample.metadata["exact_number_pred"] = pred
    if pred is None:
        return 0.0
    tolerance = getattr(args, "exact_number_tolerance", 0.0)  # absent when the plugin is disabled
    return 1.0 if math.isclose(pred, gold, rel_tol=0.0, abs_tol=tolerance) else 0.0
