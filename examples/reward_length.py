#!/usr/bin/env python3
"""Example reward program for `moetune rl` (rl.reward = ["command"], see docs/rewards.md).

Protocol: moetune starts this program once and keeps it running. For each completion
it writes one JSON object on a line to our stdin:
    {"prompt": ..., "completion": ..., "truncated": true|false, "answer": "46" or null,
     <every other column of the prompt row>}
and we answer one number per line on stdout, in the same order, flushing each line.
Diagnostics go to stderr. We exit when stdin closes.

Reward here: 1 for a correct final answer (the last number of the completion equals the
reference answer exactly as a fraction), minus 0.01 per character of the completion
(at most 0.5), so that among correct answers the shorter ones win. A truncated
completion gets no credit for correctness. Standard library only.
"""
import json
import re
import sys
from fractions import Fraction

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def as_fraction(text):
    try:
        return Fraction(text.replace(",", "").strip().rstrip("."))
    except (ValueError, ZeroDivisionError):
        return None


def correct(completion, answer):
    if answer is None:
        return False
    found = NUMBER.findall(completion.replace(",", ""))
    if not found:
        return False
    predicted, reference = as_fraction(found[-1]), as_fraction(str(answer))
    if predicted is None or reference is None:
        return found[-1] == str(answer).strip()
    return predicted == reference


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        row = json.loads(line)
        completion = row["completion"]
        reward = 0.0
        if not row.get("truncated") and correct(completion, row.get("answer")):
            reward = 1.0
        reward -= min(0.5, 0.01 * len(completion))
        print(reward, flush=True)


if __name__ == "__main__":
    main()
