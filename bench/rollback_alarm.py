"""How the low-confidence rollback alarm behaves over one bake: `.venv/bin/python bench/rollback_alarm.py`.

A Monte Carlo simulation of the alarm as the Endpoint stack synthesizes it (stacks/endpoint_stack.py): each minute
the share of low-confidence answers minus the baseline, alarming when it exceeds the rise in 2 of 3 minutes, over
one `canary_bake_minutes` bake. Answers per minute are binomial around the old model's share (the baseline) or a
new model's, worse by some points and diluted by the canary's share of the traffic. It answers the two questions
that choose `rollback_low_confidence_rise`: how often an equally good model is rolled back, and how often a worse
one is caught. Figures go to bench/results/rollback_alarm.json.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")  # before jsii starts

from stacks.config import SconesConfig  # noqa: E402
from stacks.endpoint_stack import ROLLBACK_DATAPOINTS, ROLLBACK_EVALUATION_PERIODS  # noqa: E402

BASELINE = 0.15  # the old model's low-confidence share
TRIALS = 20_000
RESULTS = ROOT / "bench" / "results" / "rollback_alarm.json"


def rolled_back(rng, answers: int, share: float, rise: float, minutes: int) -> float:
    """The share of simulated bakes in which the alarm fires."""
    low = rng.binomial(answers, share, size=(TRIALS, minutes))
    breaching = (100 * low / answers - 100 * BASELINE > rise).astype(int)
    periods = ROLLBACK_EVALUATION_PERIODS
    windows = sum(breaching[:, i : minutes - periods + 1 + i] for i in range(periods))  # bad minutes per window
    return float((windows >= ROLLBACK_DATAPOINTS).any(axis=1).mean())


def main() -> None:
    rng = np.random.default_rng(7)
    defaults = SconesConfig()
    minutes = defaults.canary_bake_minutes
    rows = []
    for answers in (10, 30, 100, 600):
        for rise in (3, 5, 10, 15, 20):
            for canary_percent in (100, 50, 10):
                for worse in (0, 15, 20, 25, 30, 40):
                    share = BASELINE + worse / 100 * canary_percent / 100
                    rows.append(
                        {
                            "answers_per_minute": answers,
                            "rise": rise,
                            "traffic_on_new_model_percent": canary_percent,
                            "new_model_worse_points": worse,
                            "rolled_back": round(rolled_back(rng, answers, share, rise, minutes), 4),
                        }
                    )
    header = json.dumps({"baseline": BASELINE, "bake_minutes": minutes, "trials": TRIALS})[:-1]
    RESULTS.write_text(f'{header}, "runs": [\n' + ",\n".join(json.dumps(row) for row in rows) + "\n]}\n")

    def shown(answers, rise, traffic, worse):
        (row,) = [
            r["rolled_back"]
            for r in rows
            if (r["answers_per_minute"], r["rise"], r["traffic_on_new_model_percent"], r["new_model_worse_points"])
            == (answers, rise, traffic, worse)
        ]
        return f"{row:.2%}"

    for answers in (10, 30, 100):
        print(
            f"{answers:>3} answers/min, rise {defaults.rollback_low_confidence_rise:g}: good model rolled back "
            f"{shown(answers, 15, 100, 0)}, 20 points worse caught {shown(answers, 15, 100, 20)} (all traffic), "
            f"{shown(answers, 15, 10, 20)} (10% canary)"
        )


if __name__ == "__main__":
    main()
