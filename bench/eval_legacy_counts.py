"""Give an eval summary from before summaries carried counts what `eval-merge --extend` needs.

The summaries of the demo model's evaluation were merged before `counts` and `setting` existed,
and their chunks are gone. Both can be recovered without the chunks:
- counts, from the pairs file and the chunk names, as that merge counted: genuine pairs; second
  images once over all chunks for the cosine and the detection rate; once per chunk for recovery
  and linkage. Each count must turn the summary's fractions into whole numbers, or this refuses.
- setting, from the model folder (its fingerprint) and the evaluation's defaults.

    python bench/eval_legacy_counts.py bench/results/eval-lfw64-dev.json --model models/demo-lfw64 \
        --pairs ../shared/data/lfw/dev_pairs.txt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from revanon_rt.evaluate import _pair_range, _whole, read_pairs
from revanon_rt.fingerprint import model_fingerprint
from revanon_rt.model_dir import inspect_model_dir


def legacy_counts(summary: dict, pairs_file: Path) -> dict:
    pairs = read_pairs(pairs_file)
    chunks = [[pairs[i] for i in _pair_range(name)] for name in summary["chunks"]]
    per_chunk = sum(len({p.second for p in chunk}) for chunk in chunks)
    once = len({p.second for chunk in chunks for p in chunk})
    counts = {"genuine_pairs": sum(p.same for chunk in chunks for p in chunk), "cosine": once,
              "face_detection": once, "recovery": per_chunk, "linkage": per_chunk}
    if counts["genuine_pairs"] != summary["genuine_pairs"]:
        raise SystemExit(f"the chunks hold {counts['genuine_pairs']} genuine pairs, the summary {summary['genuine_pairs']}")
    for fraction in summary["tar_at_far_0.1%"].values():
        _whole(fraction, counts["genuine_pairs"])
    for fraction in summary["face_detection_rate"].values():
        _whole(fraction, counts["face_detection"])
    for fraction in (summary["linkage"]["top1"], summary["linkage"]["top5"]):
        _whole(fraction, counts["linkage"])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("summary", type=Path)
    parser.add_argument("--model", type=Path, required=True, help="The model folder the evaluation ran on.")
    parser.add_argument("--pairs", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    summary = json.loads(args.summary.read_text())
    if "counts" in summary:
        raise SystemExit(f"{args.summary} already has counts")
    summary["counts"] = legacy_counts(summary, args.pairs)
    summary["setting"] = {"model_fingerprint": model_fingerprint(args.model), "steps": args.steps,
                          "image_size": inspect_model_dir(args.model).image_size,
                          "linkage_candidates": summary["linkage"]["candidates"]}
    args.summary.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({"counts": summary["counts"], "setting": summary["setting"]}, indent=1))


if __name__ == "__main__":
    main()
