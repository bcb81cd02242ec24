"""Apply the learning-rate selection rule of scripts/smollm2_sweep.sh (written there
before any sweep point ran) to results/smollm2-sweep and write the chosen rate per
arm to <sweep>/selected.json, with every point's figures beside it.

Rule: per arm, the rate with the most stored bits on the held-out phrasing among the
rates that raise news bpb by at most 0.10 over the untouched model; if no rate stays
within that, the rate that raises it least.

    python scripts/smollm2_select.py results/smollm2-sweep"""

import json
import sys
from pathlib import Path

FORGETTING_BUDGET = 0.10  # news bpb over the untouched model's


def select(sweep: Path) -> dict:
    points = {}
    for summary in sorted(sweep.glob("*/retrofit.json")):
        arm, rate = summary.parent.name.split("-", 1)  # bank-1e-2 -> bank, 1e-2
        record = json.loads(summary.read_text())
        points.setdefault(arm, {})[rate] = {
            "knowledge_bits": record["after"]["knowledge_bits"],
            "recall_accuracy": record["after"]["recall_accuracy"],
            "news_bpb_increase": record["after"]["general_bpb"] - record["before"]["general_bpb"],
        }
    chosen = {}
    for arm, rates in points.items():
        within = {r: p for r, p in rates.items() if p["news_bpb_increase"] <= FORGETTING_BUDGET}
        if within:
            chosen[arm] = max(within, key=lambda r: within[r]["knowledge_bits"])
        else:
            chosen[arm] = min(rates, key=lambda r: rates[r]["news_bpb_increase"])
    return {"rule": __doc__.split("Rule: ")[1].split("\n\n")[0].replace("\n", " "), "chosen": chosen, "points": points}


if __name__ == "__main__":
    sweep = Path(sys.argv[1])
    result = select(sweep)
    (sweep / "selected.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["chosen"]))
