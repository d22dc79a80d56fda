"""The floor under the known-plaintext attack with per-face nonces, measured over many draws.

With a fresh nonce per face, the attacker's estimate from face A is p_A * s_A (s_A: where the signs of A's two
inversions disagree). On face B's anonymized latent p_B * z_B it leaves p_B * p_A * s_A inside B's mask, which is
uniform ±1 and independent of z_B whatever s_A is, because p_B is (SHAKE-256 of the key and B's nonce). The
attack is then a wrong-key recovery in distribution: its TAR and the random-key TAR estimate one number, and a
single draw of each over 600 pairs differs by chance alone. This measures that number and its spread. Over the
targets of a `revanon-rt eval` run it redoes
- the wrong-key recovery with the run's random key and with --draws - 1 fresh keys;
- the nonce attack with the run's partner (the next target) and with the targets 2 .. --draws further on;
scores every output with dlib as the evaluation does, and reports each draw's TAR at the run's threshold and
how the passes spread over pairs. The run's own draws must reproduce its stored images byte for byte, which
checks that this is the evaluation's transform.

    python bench/attack_floor.py --eval work/eval-anchored --model models/demo-lfw64-latent \
        [--draws 4] [--name attack-floor-lfw64-latent-anchored-dev]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LFW_DEV_CROPS, machine, write_results  # noqa: E402

EVAL_SEED = 0  # `revanon-rt eval`'s keys and nonces come from seed 0
FRESH_KEYS_SEED = 7


def fresh_keys(count: int) -> list[bytes]:
    rng = np.random.default_rng(FRESH_KEYS_SEED)
    return [bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in range(count)]


def chunk_draws(backend, chunk: Path, images, draws: int, batch: int) -> tuple[list[str], dict, dict]:
    """The chunk's targets, their uint8 outputs per (condition, draw), and whether draw 0 reproduced the chunk."""
    from revanon_rt.evaluate import (_denoised, _inverted, _load, _png_name, evaluation_keys, image_nonce,
                                     known_plaintext_estimates)
    from revanon_rt.keys import flip_subkey
    from revanon_rt.masks import face_map_from_file, latent_mask
    from revanon_rt.pipeline import crop_patterns, in_parts

    facts = json.loads((chunk / "transform.json").read_text())
    if facts["model_fingerprint"] != backend.fingerprint:
        raise SystemExit(f"{chunk} was transformed by model {facts['model_fingerprint'][:12]}, not --model's "
                         f"{backend.fingerprint[:12]}")
    targets, steps = facts["targets"], facts["steps"]
    n = len(targets)
    if draws >= n:
        raise SystemExit(f"{chunk} has {n} targets: --draws {draws} would give a target its own pair")
    _, h, w = backend.latent_shape
    originals = np.stack([images(name) for name in targets])
    anonymized = np.stack([_load(chunk / "images" / "anonymized", name) for name in targets])
    masks = np.stack([latent_mask(face_map_from_file(chunk / "masks" / _png_name(name)), (h, w))
                      for name in targets])
    nonces = [image_nonce(EVAL_SEED, name) for name in targets]
    keys = [evaluation_keys(EVAL_SEED)["random_key"], *fresh_keys(draws - 1)]
    batches = in_parts(list(range(n)), batch)  # the evaluation's batches, so that draw 0 is bit for bit its own

    z_orig = np.zeros((n, *backend.latent_shape), np.float32)
    z_anon = np.zeros_like(z_orig)
    keeps = []
    for idx in batches:
        z_orig[idx] = _inverted(backend, originals[idx], steps)[-1]
        keeps.append(_inverted(backend, anonymized[idx], steps))
        z_anon[idx] = keeps[-1][-1]
        print(f"  {chunk.name}: inverted {idx[-1] + 1}/{n}", file=sys.stderr, flush=True)
    out = {(condition, d): np.zeros_like(originals) for condition in ("random_key", "attack_nonce")
           for d in range(draws)}
    for idx, keep in zip(batches, keeps):
        for d, key in enumerate(keys):
            patterns = crop_patterns(backend, [nonces[i] for i in idx], flip_subkey(key))
            out["random_key", d][idx] = _denoised(backend, keep, masks[idx], patterns, steps)
            estimates = known_plaintext_estimates(z_anon, z_orig, masks, [(i + 1 + d) % n for i in idx])
            out["attack_nonce", d][idx] = _denoised(backend, keep, masks[idx], estimates, steps)
        print(f"  {chunk.name}: denoised {idx[-1] + 1}/{n}", file=sys.stderr, flush=True)
    reproduced = {condition: sum(np.array_equal(out[condition, 0][i], _load(chunk / "images" / condition, name))
                                 for i, name in enumerate(targets))
                  for condition in ("random_key", "attack_nonce")}
    return targets, out, reproduced


def eval_summary(folder: Path) -> Path:
    """The run's metrics.json: the merged one, or its only chunk's, since a one-chunk run has nothing to merge."""
    merged, chunks = folder / "metrics.json", sorted(folder.glob("chunk-*/metrics.json"))
    if merged.is_file():
        return merged
    if len(chunks) == 1:
        return chunks[0]
    raise SystemExit(f"{folder}: no metrics.json; merge its {len(chunks)} scored chunks with "
                     "`revanon-rt eval-merge` first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", type=Path, required=True, help="a `revanon-rt eval --out` folder: one chunk, or merged")
    parser.add_argument("--model", type=Path, required=True, help="the model that run transformed with")
    parser.add_argument("--images", type=Path, default=LFW_DEV_CROPS)
    parser.add_argument("--draws", type=int, default=4, help="random keys, and attack partners, per target")
    parser.add_argument("--batch", type=int, default=16, help="the run's --batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="attack-floor")
    args = parser.parse_args()

    from revanon_rt.api import open_backend
    from revanon_rt.evaluate import ZipImages, wilson_interval
    from revanon_rt.faces import Recognizer

    summary = json.loads(eval_summary(args.eval).read_text())
    threshold = summary["threshold_cosine_far_0.1%"]
    backend = open_backend(args.model, None, args.device)
    images = ZipImages(args.images, backend.image_size)
    recognizer = Recognizer()
    started = time.perf_counter()
    rows, reproduced, targets_total = [], {"random_key": 0, "attack_nonce": 0}, 0
    for chunk in sorted(args.eval.glob("chunk-*")):
        targets, out, chunk_reproduced = chunk_draws(backend, chunk, images, args.draws, args.batch)
        targets_total += len(targets)
        for condition in reproduced:
            reproduced[condition] += chunk_reproduced[condition]
        features = np.load(chunk / "features.npz")
        stored = {tuple(str(k).split("\t")): d for k, d in zip(features["keys"], features["descriptors"])}
        descriptors = {(condition, d, name): recognizer.describe(out[condition, d][i])[0]
                       for (condition, d) in out for i, name in enumerate(targets)}
        for pair in features["pairs"]:
            first, second, same = str(pair).split("\t")
            if same != "1":
                continue
            clean_first = stored["clean", first]
            row = {"chunk": chunk.name, "first": first, "second": second,
                   "anonymized": float(clean_first @ stored["anonymized", second]),
                   "one_bit_key": float(clean_first @ stored["one_bit_key", second]),
                   "recovered": float(clean_first @ stored["recovered", second])}
            for condition in ("random_key", "attack_nonce"):
                row[condition] = [float(clean_first @ descriptors[condition, d, second]) for d in range(args.draws)]
            rows.append(row)
        print(f"{chunk.name}: {len(targets)} targets scored", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - started

    pairs = len(rows)
    per_draw = {condition: [int(sum(r[condition][d] > threshold for r in rows)) for d in range(args.draws)]
                for condition in ("random_key", "attack_nonce")}
    cosine = {condition: [float(np.mean([r[condition][d] for r in rows])) for d in range(args.draws)]
              for condition in per_draw}
    # every output made with a pattern independent of the target's key: both conditions' draws and the one-bit key
    null_scores = np.array([r["random_key"] + r["attack_nonce"] + [r["one_bit_key"]] for r in rows])
    null_draws = null_scores.shape[1]
    passes_per_pair = np.sum(null_scores > threshold, axis=1)

    def rate(passes: int, trials: int) -> dict:
        return {"passes": passes, "trials": trials, "rate": passes / trials,
                "interval_95": wilson_interval(passes, trials)}

    pooled = {condition: rate(sum(per_draw[condition]), pairs * args.draws) for condition in per_draw}
    pooled["every_independent_pattern"] = rate(int(passes_per_pair.sum()), pairs * null_draws)
    passing_pairs = int(np.sum(passes_per_pair > 0))
    spread = {str(k): int(np.sum(passes_per_pair == k)) for k in range(1, null_draws + 1) if np.any(passes_per_pair == k)}
    floor_pairs = [{"first": r["first"], "second": r["second"], "passes": int(k), "of": null_draws,
                    "anonymized_passes": r["anonymized"] > threshold}
                   for r, k in zip(rows, passes_per_pair) if k >= 3]
    data = {"eval": str(args.eval), "model": str(args.model), "model_fingerprint": backend.fingerprint,
            "threshold_cosine": threshold, "genuine_pairs": pairs, "targets": targets_total, "draws": args.draws,
            "reproduced_draw_0": {c: f"{v} of {targets_total}" for c, v in reproduced.items()},
            "passes_per_draw": per_draw, "mean_cosine_per_draw": cosine, "pooled": pooled,
            "independent_pattern_draws_per_pair": null_draws, "pairs_passing_any_draw": passing_pairs,
            "pairs_by_passes": spread, "pairs_passing_3_or_more": floor_pairs,
            "seconds": seconds, "machine": machine(), "per_pair": rows}
    write_results(args.name, data, markdown(data))
    print(markdown(data))


def markdown(d: dict) -> str:
    def pct(passes, total):
        return f"{100 * passes / total:.1f}% ({passes})"

    pairs, draws = d["genuine_pairs"], d["draws"]
    lines = [
        "# The floor under the nonce attack: wrong-key recovery and the attack, redrawn",
        "",
        f"`python bench/attack_floor.py --eval {d['eval']} --model {d['model']} --draws {draws}`: "
        f"{pairs} genuine LFW dev pairs ({d['targets']} transformed second images), dlib cosine threshold "
        f"{d['threshold_cosine']:.3f} (FAR 0.1%, the evaluation's). Draw 0 is the evaluation's own random key and "
        f"attack partner; it reproduced the stored images byte for byte for "
        f"{d['reproduced_draw_0']['random_key']} (random key) and {d['reproduced_draw_0']['attack_nonce']} "
        "(attack) targets. Draws 1 on use fresh keys, and the targets 2, 3, ... further on as the attacker's pair.",
        "",
        "| draw | random key: TAR (passes) | mean cosine | nonce attack: attacker's pair | TAR (passes) | mean cosine |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k in range(draws):
        lines.append(f"| {k} | {pct(d['passes_per_draw']['random_key'][k], pairs)} | "
                     f"{d['mean_cosine_per_draw']['random_key'][k]:.4f} | target i + {k + 1} | "
                     f"{pct(d['passes_per_draw']['attack_nonce'][k], pairs)} | "
                     f"{d['mean_cosine_per_draw']['attack_nonce'][k]:.4f} |")
    lines += ["", "| pooled | passes / trials | TAR | 95% interval |", "|---|---:|---:|---:|"]
    labels = {"random_key": "random keys", "attack_nonce": "nonce attack",
              "every_independent_pattern": "both, and the one-bit key"}
    for key, label in labels.items():
        p = d["pooled"][key]
        lines.append(f"| {label} | {p['passes']} / {p['trials']} | {100 * p['rate']:.2f}% | "
                     f"{100 * p['interval_95'][0]:.2f}–{100 * p['interval_95'][1]:.2f}% |")
    spread = ", ".join(f"{count} pass {k} time{'s' if k != '1' else ''}" for k, count in d["pairs_by_passes"].items())
    lines += ["",
              f"Of the {pairs} pairs, {d['pairs_passing_any_draw']} pass under at least one of the "
              f"{d['independent_pattern_draws_per_pair']} independent patterns ({spread}).",
              f"Pairs passing 3 or more times: {len(d['pairs_passing_3_or_more'])}.",
              f"Wall time: {d['seconds']:.0f} s on {d['machine']['cpu']} ({d['machine']['cores']} cores).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
