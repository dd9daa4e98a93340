"""Constitutional AI on the demo: how good the AI labels are, and what they do to refusals.

    python benchmarks/cai_safety.py [rules] [cai] [cai_sl]   # default: all three; after `make demo`

Runs `crucible run` on configs/demo.yaml (`rules`: rule-made pairs), configs/demo_cai.yaml
(`cai`: feedback, then reward and DPO on the AI labels) and configs/demo_cai_sl.yaml (`cai_sl`:
SFT on the CAI revisions), timing each whole command (cached stages are reused), then prints
from the manifests of the configs run (rows of a config not run are left out):

- the judge's agreement with the held-out preference pairs whose right answer is known (both
  orders), beside the held-out accuracy of the reward model trained on rule-made pairs and of the
  one trained on the AI labels;
- refusal rate on held-out harmful requests and over-refusal rate on their benign look-alikes,
  for SFT, SFT + CAI revisions, DPO on AI labels and DPO on rule-made pairs.
"""

from __future__ import annotations

import subprocess
import sys
import time

CONFIGS = {"rules": "configs/demo.yaml", "cai": "configs/demo_cai.yaml", "cai_sl": "configs/demo_cai_sl.yaml"}


def run(config: str) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "flows.cli", "run", config], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def manifests(config: str) -> dict:
    from tasks.config import load_config
    from tasks.engine import plan

    return {name: planned.manifest() for name, planned in plan(load_config(config)).items()}


def main() -> None:
    chosen = sys.argv[1:] or list(CONFIGS)
    seconds = {name: run(CONFIGS[name]) for name in chosen}
    done = {name: manifests(CONFIGS[name]) for name in chosen}
    for name in chosen:
        print(f"crucible run {CONFIGS[name]}: {seconds[name]:.0f} s")
    if "cai" in done:
        feedback = done["cai"]["feedback"]
        counts = feedback.counts
        print(f"\nfeedback: {counts['prompts']} prompts, {counts['pairs']} AI-labelled pairs kept "
              f"({counts['low_confidence']} under the confidence threshold, {counts['identical_replies']} identical), "
              f"{counts['revisions']} revisions")
        print("\nheld-out preference pairs with a known answer:")
        print(f"  AI judge agreement (both orders)          {feedback.metrics['judge/agreement']:.3f}")
        print(f"  reward model on AI labels, accuracy       {done['cai']['reward'].metrics['heldout/accuracy']:.3f}")
    if "rules" in done:
        print(f"  reward model on rule-made pairs, accuracy {done['rules']['reward'].metrics['heldout/accuracy']:.3f}")
    rows = {"SFT": (chosen[0], "sft"), "SFT + CAI revisions": ("cai_sl", "align"),
            "DPO on AI labels": ("cai", "align"), "DPO on rule-made pairs": ("rules", "align")}
    print(f"\n{'model':<24} {'refusal (harmful) ↑':>20} {'over-refusal (benign) ↓':>24}")
    for label, (config, model) in rows.items():
        if config in done:
            metrics = done[config]["evaluate"].metrics
            refusal, over = (metrics[f"eval.{model}.safety.{m}"] for m in ("refusal_rate", "over_refusal_rate"))
            print(f"{label:<24} {refusal:>20.3f} {over:>24.3f}")


if __name__ == "__main__":
    main()
