"""How well can the method recover at all? The recovery budget with an ideal ε instead of a trained UNet.

Faces are modelled as a Gaussian, x0 ~ N(μ, Σ), fitted to the training crops (mean and principal
components; the variance left outside the kept components is spread evenly over the rest). For a
Gaussian the best possible ε-prediction has a closed form,

    ε*(x_t, t) = sqrt(1 − ā) · (ā·Σ + (1 − ā)·I)^-1 · (x_t − sqrt(ā)·μ),

so this model has no training error: whatever recovery still loses comes from the method as the spec
fixes it (50 DDIM steps, re-injection outside the mask, 8-bit storage). Σ couples every pixel with
every other, as a UNet's receptive field does, so re-injection disturbs it the way it disturbs a UNet.
The rows are those of recovery_budget.py, on the same crops, mask and flip patterns, and at the
schedule of --model (only its scheduler config and size are used), plus one that flips the face
without putting anything back (re-injection's share), the same rows for --model itself, dlib cosines,
and, from the closed form, what a DDIM round trip keeps of each direction of the Gaussian.

--patch P runs the ideal ε in the latent of a linear autoencoder (each P x P patch onto its first
--channels principal components, scaled to unit variance) instead of in pixels: what a latent space
changes, with the autoencoder's own loss shown beside it. A latent --model runs it in the latent of
that model's own trained autoencoder: the ideal ε on the codec the trained UNet has, so the gap between
the two latents is what the autoencoder costs (a linear one has E(D(z)) = z exactly; a trained one does
not, and recovery re-encodes what the decoder drew). --beta-schedule and --spacing try other noise
schedules.

    python bench/oracle_recovery.py --model models/demo-lfw64 [--train train-128.zip] [--fit 6000]
        [--components 2000] [--count 16] [--steps 50 200] [--trained-steps 50] [--patch 4 --channels 8]
    python bench/oracle_recovery.py --model models/demo-lfw64-latent --steps 50
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dev_crop_arguments, dev_crop_setup, machine, match_threshold, write_results  # noqa: E402
from inversion_drift import local_energy_spread  # noqa: E402
from recovery_budget import budget_psnrs  # noqa: E402

LFW_TRAIN_CROPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw" / "train-128.zip"


def training_crops(path: Path, size: int, count: int) -> np.ndarray:
    """The first `count` training crops (sorted names) at the model's size, as N x 3·H·W in [-1, 1]."""
    from revanon_rt.pixels import to_model
    from revanon_rt.train import load_crops

    crops = to_model(load_crops(path, size)[:count])
    return crops.reshape(len(crops), -1)


class GaussianFaces:
    """A pixel-space backend whose ε is the exact posterior mean for x0 ~ N(μ, U·diag(λ)·Uᵀ + floor·(I − U·Uᵀ))."""

    def __init__(self, data: np.ndarray, components: int, alphas_cumprod: np.ndarray, shape: tuple[int, int, int]):
        self.shape = shape
        self.mean = data.mean(0).astype(np.float64)
        centred = data.astype(np.float64) - self.mean
        gram = centred @ centred.T
        values, vectors = np.linalg.eigh(gram)
        components = min(components, *centred.shape)
        order = np.argsort(values)[::-1][:components]
        values, vectors = values[order], vectors[:, order]
        self.basis = (centred.T @ vectors) / np.sqrt(values)  # D x K, orthonormal columns
        self.variances = values / len(data)
        total = (centred ** 2).sum() / len(data)
        rest = centred.shape[1] - components
        self.floor = max(total - self.variances.sum(), 0.0) / rest if rest else 0.0
        self.alphas_cumprod = alphas_cumprod.astype(np.float64)

    def encode(self, x):
        return x

    def decode(self, z):
        return z

    def eps(self, z, t):
        a = self.alphas_cumprod[t]
        s, r = np.sqrt(a), np.sqrt(1 - a)
        d = z.reshape(len(z), -1).astype(np.float64) - s * self.mean
        along = 1 / (a * self.variances + (1 - a))
        rest = 1 / (a * self.floor + (1 - a))
        coords = d @ self.basis
        out = r * (rest * d + (coords * (along - rest)) @ self.basis.T)
        return out.reshape(z.shape).astype(np.float32)

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        coords = rng.standard_normal((count, len(self.variances))) * np.sqrt(self.variances)
        rest = rng.standard_normal((count, len(self.mean))) * np.sqrt(self.floor)
        rest -= (rest @ self.basis) @ self.basis.T
        return (self.mean + coords @ self.basis.T + rest).reshape(count, *self.shape).astype(np.float32)


class PatchLatent:
    """A linear autoencoder with a spatial latent, to see what a latent space changes: each P x P patch
    is projected onto the first C principal components of training patches, each scaled to unit
    variance, giving a C x (H/P) x (W/P) latent. Decoding is the inverse projection."""

    def __init__(self, crops: np.ndarray, size: int, patch: int, channels: int):
        from revanon_rt.pixels import to_u8
        from revanon_rt.train_autoencoder import LinearPatchLatent

        # the fit train-autoencoder anchors its encoder to; crops are exact 8-bit values, so to_u8 is lossless
        fit = LinearPatchLatent(to_u8(crops.reshape(-1, 3, size, size)), patch, channels, count=len(crops))
        self.size, self.patch, self.channels = size, patch, channels
        self.mean, self.basis, self.scale = fit.mean, fit.basis, fit.scale
        self.shape = (channels, size // patch, size // patch)

    def _patches(self, x: np.ndarray) -> np.ndarray:
        n, p, g = len(x), self.patch, self.size // self.patch
        return x.reshape(n, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g, g, 3 * p * p)

    def encode(self, x):
        z = (self._patches(x).astype(np.float64) - self.mean) @ self.basis / self.scale
        return z.transpose(0, 3, 1, 2).astype(np.float32)

    def decode(self, z):
        n, p, g = len(z), self.patch, self.size // self.patch
        patches = (z.transpose(0, 2, 3, 1).astype(np.float64) * self.scale) @ self.basis.T + self.mean
        x = patches.reshape(n, g, g, 3, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(n, 3, self.size, self.size)
        return x.astype(np.float32)


class TrainedAutoencoder:
    """A latent model's own autoencoder as the codec of the ideal ε (spec §1's E and D)."""

    def __init__(self, backend, batch: int = 256):
        self.backend, self.batch = backend, batch
        self.size, self.shape = backend.image_size, tuple(backend.latent_shape)

    def _batched(self, fn, arrays: np.ndarray) -> np.ndarray:
        return np.concatenate([fn(arrays[i:i + self.batch]) for i in range(0, len(arrays), self.batch)])

    def encode(self, x):
        return self._batched(self.backend.encode, x)

    def decode(self, z):
        return self._batched(self.backend.decode, z)


class LatentGaussian:
    """The ideal ε in the latent of a PatchLatent or a TrainedAutoencoder."""

    def __init__(self, codec: "PatchLatent | TrainedAutoencoder", crops: np.ndarray, components: int,
                 alphas_cumprod: np.ndarray):
        self.codec = codec
        latents = codec.encode(crops.reshape(-1, 3, codec.size, codec.size))
        by_channel = latents.transpose(1, 0, 2, 3).reshape(len(latents[0]), -1)
        self.channel_variances = by_channel.var(axis=1)
        self.channel_correlation = np.corrcoef(by_channel)
        self.gaussian = GaussianFaces(latents.reshape(len(crops), -1), components, alphas_cumprod, codec.shape)
        self.floor = self.gaussian.floor

    def encode(self, x):
        return self.codec.encode(x)

    def decode(self, z):
        return self.codec.decode(z)

    def eps(self, z, t):
        return self.gaussian.eps(z, t)

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return self.codec.decode(self.gaussian.sample(rng, count))


def schedule_of(reference, beta_schedule: str | None, spacing: str | None):
    """The model's noise schedule, or the same config with other betas or timestep spacing."""
    if beta_schedule is None and spacing is None:
        return reference.noise
    import dataclasses

    from revanon_rt.reference import load_noise_schedule

    config = dict(reference.layout.scheduler_config)
    config.update({k: v for k, v in (("beta_schedule", beta_schedule), ("timestep_spacing", spacing)) if v})
    return load_noise_schedule(dataclasses.replace(reference.layout, scheduler_config=config))


def identity_figures(recognizer, originals, anonymized, recovered, threshold: float) -> dict:
    """dlib cosine of each original with its anonymized and its recovered version, and how many of each
    would still pass as the same person at the evaluation's threshold."""
    def cosines(others):
        return np.array([recognizer.describe(a)[0] @ recognizer.describe(b)[0] for a, b in zip(originals, others)])

    anon, rec = cosines(anonymized), cosines(recovered)
    return {"cosine_anonymized": float(anon.mean()), "cosine_recovered": float(rec.mean()),
            "match_anonymized": float((anon >= threshold).mean()), "match_recovered": float((rec >= threshold).mean())}


def round_trip(levels: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """What DDIM inversion followed by denoising keeps of a direction of the Gaussian with variance λ
    (1 would be exact). With the ideal ε both walks are affine, d ↦ g·d + offset per step along each
    direction; this is g's product. Each step of either walk evaluates ε at the timestep of the
    higher-noise level (spec §3), whichever level z is at: the inversion's ε is a step ahead of z."""
    lam = np.asarray(variances, np.float64)
    levels = np.asarray(levels, np.float64)

    def gain(a_from, a_to, a_eps):
        s, r = np.sqrt(a_from), np.sqrt(1 - a_from)
        c = np.sqrt(1 - a_eps) / (a_eps * lam + 1 - a_eps)
        return np.sqrt(a_to) * (1 - r * c) / s + np.sqrt(1 - a_to) * c

    kept = np.ones_like(lam)
    for i in range(len(levels) - 1):
        noisier, cleaner = levels[i], levels[i + 1]
        kept *= gain(noisier, cleaner, noisier) * gain(cleaner, noisier, noisier)
    return kept


def round_trip_losses(gaussian: "GaussianFaces", levels: np.ndarray) -> dict:
    """|round trip − 1| averaged over the directions as a face's own energy weights them (what a plain
    inversion and denoising sees) and over all directions alike (what a sign flip, which spreads a
    latent's energy evenly over every direction, sees)."""
    dims = gaussian.basis.shape[0]
    rest = dims - len(gaussian.variances)
    variances = np.append(gaussian.variances, gaussian.floor)
    counts = np.append(np.ones(len(gaussian.variances)), rest)
    loss = np.abs(round_trip(levels, variances) - 1)
    return {"by_energy": float((loss * variances * counts).sum() / (variances * counts).sum()),
            "all_directions": float((loss * counts).sum() / dims),
            "directions_below_0.01": float(counts[variances < 0.01].sum() / dims)}


def closed_form_error(gaussian: "GaussianFaces", schedule) -> float:
    """The largest gap between round_trip and the spec's own loop (sampler.inverted, then denoising with
    nothing flipped), along the first, a middle and the last component and one floor direction."""
    from revanon_rt.sampler import flipped_and_denoised, inverted

    shape = (1, *gaussian.shape)
    whole, unflipped = np.ones((1, 1, *shape[2:]), np.float32), np.ones(shape, np.float32)

    def there_and_back(x):
        keep = inverted(gaussian, x.reshape(shape).astype(np.float32), schedule)
        return flipped_and_denoised(gaussian, keep, whole, unflipped, schedule).ravel().astype(np.float64)

    floor = np.random.default_rng(0).standard_normal(len(gaussian.mean))
    floor -= gaussian.basis @ (gaussian.basis.T @ floor)
    k = len(gaussian.variances)
    directions = [(gaussian.basis[:, i], gaussian.variances[i]) for i in (0, k // 2, k - 1)]
    directions.append((floor / np.linalg.norm(floor), gaussian.floor))
    base, step = there_and_back(gaussian.mean), 0.3
    gaps = [abs((there_and_back(gaussian.mean + step * u) - base) @ u / step - round_trip(schedule.levels, [lam])[0])
            for u, lam in directions]
    return float(max(gaps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dev_crop_arguments(parser)
    parser.add_argument("--train", type=Path, default=LFW_TRAIN_CROPS)
    parser.add_argument("--fit", type=int, default=6000, help="training crops to fit the Gaussian on")
    parser.add_argument("--components", type=int, default=2000)
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--beta-schedule", default=None,
                        help="replace the model's betas (diffusers name: linear, scaled_linear, squaredcos_cap_v2)")
    parser.add_argument("--spacing", default=None, help="replace the model's timestep_spacing")
    parser.add_argument("--patch", type=int, default=0,
                        help="run the ideal ε in the latent of a linear patch autoencoder with this patch side")
    parser.add_argument("--channels", type=int, default=8, help="latent channels of --patch")
    parser.add_argument("--trained-steps", type=int, nargs="*", default=[50],
                        help="step counts at which --model itself also runs, for comparison")
    parser.add_argument("--threshold", type=float, default=None,
                        help="cosine threshold for a match (default: the one in results/eval-lfw{SIZE}-dev.json "
                             "at the model's size, else eval-lfw64-dev.json)")
    args = parser.parse_args()

    from revanon_rt.faces import Recognizer, template_region
    from revanon_rt.keys import flip_pattern, flip_subkey
    from revanon_rt.masks import latent_mask
    from revanon_rt.pixels import clamped_share, pixel_region, psnr, to_model, to_u8
    from revanon_rt.sampler import inverted, transform

    reference, rgb, mask, flips = dev_crop_setup(args)
    threshold_source = "given"
    if args.threshold is None:
        args.threshold, threshold_source = match_threshold(reference.image_size)
    recognizer = Recognizer()
    size, shape = reference.image_size, tuple(reference.latent_shape)
    trained_codec = reference.layout.autoencoder
    if trained_codec and args.patch:
        raise SystemExit("--patch replaces the autoencoder: pass a pixel-space --model for its schedule")
    start = time.perf_counter()
    noise = schedule_of(reference, args.beta_schedule, args.spacing)
    alphas = np.asarray(noise.alphas_cumprod, np.float32)
    crops = training_crops(args.train, size, args.fit)
    if args.patch:
        oracle = LatentGaussian(PatchLatent(crops, size, args.patch, args.channels), crops, args.components, alphas)
        c, h, w = oracle.codec.shape
        mask = latent_mask(template_region(size), (h, w))
        k_flip = flip_subkey(bytes(32))
        flips = np.stack([flip_pattern(k_flip, bytes([i]) * 16, (c, h, w)) for i in range(len(rgb))])
    elif trained_codec:
        oracle = LatentGaussian(TrainedAutoencoder(reference), crops, args.components, alphas)
    else:
        oracle = GaussianFaces(crops, args.components, alphas, shape)
    del crops
    fit_seconds = time.perf_counter() - start
    print(f"fitted on {args.fit} crops, {args.components} components, floor variance {oracle.floor:.2e}, "
          f"{fit_seconds:.0f} s", flush=True)

    n = len(rgb)
    masks = np.repeat(mask[None, None].astype(np.float32), n, axis=0)
    whole = np.ones_like(masks)
    where = np.repeat(pixel_region(mask, (size, size))[None], n, 0)
    samples_u8 = to_u8(oracle.sample(np.random.default_rng(0), n))

    def region_psnr(a, b):
        return psnr(a[where], b[where])

    latent = args.patch or trained_codec
    codec_psnr, codec = None, {}
    if latent:
        # the autoencoder alone bounds recovery: what D(E(x)) keeps of identity, and how far E(D(z)) from the
        # 8-bit image lands from z, which recovery re-encodes and inversion then amplifies
        z = oracle.encode(to_model(rgb))
        drawn = to_u8(oracle.decode(z))
        codec_psnr = region_psnr(drawn, rgb)
        alone = identity_figures(recognizer, rgb, drawn, drawn, args.threshold)
        miss = oracle.encode(to_model(drawn)) - z
        off_diagonal = np.abs(oracle.channel_correlation - np.eye(len(oracle.channel_correlation)))
        codec = {"psnr": codec_psnr, "cosine": alone["cosine_recovered"], "match": alone["match_recovered"],
                 "re_encoding_error": float(np.sqrt((miss ** 2).mean() / (z ** 2).mean())),
                 "channel_variances": [round(float(v), 4) for v in oracle.channel_variances],
                 "largest_channel_correlation": float(off_diagonal.max())}

    def budget(backend, originals, sched, with_identity: bool) -> dict:
        out, anonymized, recovered = budget_psnrs(backend, originals, masks, flips, sched, region_psnr)
        x = to_model(originals)
        face_flips = np.where(masks > 0, flips, np.float32(1))  # the same flips, nothing put back
        anonymized_free = transform(backend, x, whole, face_flips, sched)
        out.update({
            "psnr_recovered_no_reinjection_float": region_psnr(
                to_u8(transform(backend, anonymized_free, whole, face_flips, sched)), originals),
            "clamped_share_anonymized": float(np.mean(clamped_share(anonymized, masks[:, 0]))),
            "energy_spread_z_T": local_energy_spread(inverted(backend, x, sched)[-1]),
        })
        if with_identity:
            out.update(identity_figures(recognizer, originals, to_u8(anonymized), recovered, args.threshold))
        return out

    rows = []
    for steps in args.steps:
        began = time.perf_counter()
        runs = [("ideal ε", "lfw", oracle, rgb, noise), ("ideal ε", "sample", oracle, samples_u8, noise)]
        if steps in args.trained_steps and not args.patch:  # a latent model runs on the oracle's codec
            runs.append((f"trained: {args.model.name}", "lfw", reference, rgb, reference.noise))
        for model_label, faces, backend, originals, schedule in runs:
            rows.append({"steps": steps, "model": model_label, "faces": faces,
                         **budget(backend, originals, schedule.for_steps(steps), faces == "lfw")})
            if backend is oracle and faces == "lfw":
                gaussian = getattr(oracle, "gaussian", oracle)
                rows[-1]["round_trip_loss"] = round_trip_losses(gaussian, schedule.for_steps(steps).levels)
                rows[-1]["round_trip_loss"]["closed_form_error"] = closed_form_error(gaussian, schedule.for_steps(steps))
            print(rows[-1], flush=True)
        print(f"{steps} steps: {time.perf_counter() - began:.0f} s", flush=True)

    columns = [("reconstruction (no flip)", "psnr_reconstruction"), ("anonymized", "psnr_anonymized"),
               ("recovered, float anonymized", "psnr_recovered_float"),
               ("recovered, float anonymized clamped to [−1, 1]", "psnr_recovered_clamped_float"),
               ("recovered (8-bit PNG)", "psnr_recovered"),
               ("recovered, face flipped, nothing put back, float", "psnr_recovered_no_reinjection_float"),
               ("recovered, whole-image mask, float", "psnr_recovered_whole_mask_float"),
               ("recovered, whole-image mask (8-bit PNG)", "psnr_recovered_whole_mask")]
    schedule_name = (f"the model's betas and spacing replaced by {args.beta_schedule or 'its own'} / "
                     f"{args.spacing or 'its own'}" if args.beta_schedule or args.spacing else "as the model's")
    if latent:
        grid = " x ".join(map(str, oracle.codec.shape))
        codec_name = (f"linear autoencoder ({args.patch} x {args.patch} patches onto their first {args.channels} "
                      "principal components, each scaled to unit variance" if args.patch else
                      f"trained autoencoder of {args.model} (its vae/, the codec its UNet was trained on")
        space = f"in the {grid} latent of a {codec_name}; its own reconstruction of the dev crops: {codec_psnr:.2f} dB)"
    else:
        space = "in pixel space, as the model"
    lines = [f"# Recovery with an ideal ε: a Gaussian face model ({size} px, schedule of {args.model})", "",
             f"Noise schedule of the ideal ε: {schedule_name}. Diffusion space: {space}.", ""]
    if codec:
        lines += [f"The autoencoder alone, D(E(x)) as an 8-bit image: dlib cosine {codec['cosine']:.3f} with the "
                  f"original, {codec['match']:.0%} of the crops match; re-encoding that image misses z by "
                  f"{codec['re_encoding_error']:.1%} (relative RMS). Variance of each latent channel over the "
                  f"training crops: {', '.join(f'{v:.2f}' for v in codec['channel_variances'])}; largest correlation "
                  f"between two channels: {codec['largest_channel_correlation']:.2f}.", ""]
    lines += [
             f"ε is the exact posterior mean for a Gaussian fitted to {args.fit} LFW training crops "
             f"({args.components} principal components, the rest at variance {oracle.floor:.2e}), so no error comes "
             f"from training. Face-region PSNR (dB) against the originals, {n} LFW dev crops (`lfw`) and {n} faces "
             "sampled from the Gaussian itself (`sample`); mask: the template face region; one flip pattern per face. "
             "Rows as in `recovery-budget-*.md`.", "",
             "| steps | model | faces | " + " | ".join(c for c, _ in columns)
             + " | anonymized values clamped | z_T energy spread |",
             "|---|---|---|" + "---|" * (len(columns) + 2)]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['model']} | {r['faces']} | " + " | ".join(f"{r[k]:.2f}" for _, k in columns)
                     + f" | {r['clamped_share_anonymized']:.1%} | {r['energy_spread_z_T']:.3f} |")
    lines += ["", "z_T energy spread: std / mean of the RMS of 8 x 8 patches of the inverted z_T (Gaussian noise: "
              "about 0.05 in pixels, 0.025 in the 8 x 16 x 16 latent, 0.04 in the 4 x 32 x 32 one); sign flips "
              "keep it, so a high value means the flipped noise is unlike what the model denoises from.", "",
              f"Identity (dlib cosine with the original; a match is a cosine ≥ {args.threshold:.4f}, "
              + ("as given):" if threshold_source == "given" else f"the threshold at FAR = 0.1% of `{threshold_source}`):"),
              "",
              "| steps | model | cosine, anonymized | cosine, recovered | match, anonymized | match, recovered |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if "cosine_recovered" in r:
            lines.append(f"| {r['steps']} | {r['model']} | {r['cosine_anonymized']:.3f} | {r['cosine_recovered']:.3f} "
                         f"| {r['match_anonymized']:.0%} | {r['match_recovered']:.0%} |")
    lines += ["", "Why, with the ideal ε: per direction of the Gaussian, the share that a DDIM round trip (invert, then "
              "denoise, no flip) loses, |kept − 1|, averaged as a face's energy weights the directions (what "
              "reconstruction sees) and over all directions alike (what the sign flip sees: it spreads z_T's energy "
              "evenly over every direction, so recovery inherits the worst-resolved ones).", "",
              "| steps | lost, energy-weighted | lost, all directions | directions with variance < 0.01 "
              "| closed form vs the loop, largest gap |",
              "|---|---|---|---|---|"]
    for r in rows:
        if "round_trip_loss" in r:
            loss = r["round_trip_loss"]
            lines.append(f"| {r['steps']} | {loss['by_energy']:.1%} | {loss['all_directions']:.1%} "
                         f"| {loss['directions_below_0.01']:.0%} | {loss['closed_form_error']:.1e} |")
    lines.append("")
    name = args.name or f"oracle-recovery-{args.model.name}"
    write_results(name, {"model_schedule": str(args.model), "beta_schedule": args.beta_schedule,
                         "patch": args.patch, "trained_autoencoder": bool(trained_codec), "channels": args.channels if args.patch else None,
                         "codec_psnr": codec_psnr, "codec": codec, "threshold": args.threshold,
                         "threshold_source": threshold_source,
                         "spacing": args.spacing, "fit": args.fit, "components": args.components,
                         "floor_variance": oracle.floor, "fit_seconds": fit_seconds, "crops": n, "rows": rows,
                         "machine": machine()}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
