"""The DDIM schedule of spec §3: timesteps and the alpha-bar table.

The alpha-bar table comes from diffusers (torch float32 cumprod, which numpy does not
reproduce to the last bit) and is stored in engine manifests. Timesteps are integer
arithmetic that diffusers itself does in numpy, mirrored here so that a torch-free
runtime can serve any step count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import UsageError, quoted

MAX_STEPS = 1000
DEFAULT_STEPS = 50


def ddim_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading", offset: int = 0) -> list[int]:
    """t_1 > ... > t_S exactly as diffusers' DDIMScheduler.set_timesteps returns them."""
    if not 1 <= steps <= min(MAX_STEPS, num_train_timesteps):
        raise UsageError(f"--steps must be between 1 and {min(MAX_STEPS, num_train_timesteps)}, not {steps}")
    n = num_train_timesteps
    if spacing == "linspace":
        t = np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        t = (np.arange(0, steps) * (n // steps)).round()[::-1].copy().astype(np.int64) + offset
    elif spacing == "trailing":
        t = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    else:
        raise UsageError(f"unsupported timestep_spacing {spacing!r}; use leading, trailing or linspace")
    return [int(v) for v in t]


@dataclass(frozen=True)
class Schedule:
    """The S denoising timesteps and the levels ā(t_1), ..., ā(t_S), 1.0 (float32)."""

    timesteps: tuple[int, ...]
    levels: np.ndarray  # S + 1 float32 values

    @property
    def steps(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True)
class NoiseSchedule:
    """What a model's scheduler config fixes: the ā table and how timesteps are spaced.

    `stored` holds timestep lists read from an engine manifest (spec §3: a runtime uses the stored
    timesteps, it does not recompute them). Other step counts come from the integer mirror, which is
    trusted only where it reproduces every stored list."""

    alphas_cumprod: np.ndarray  # float32, num_train_timesteps values
    spacing: str = "leading"
    offset: int = 0
    stored: dict = field(default_factory=dict)  # steps -> tuple of timesteps

    def for_steps(self, steps: int) -> Schedule:
        ts = self.stored.get(steps)
        if ts is None:
            ts = ddim_timesteps(len(self.alphas_cumprod), steps, self.spacing, self.offset)
            for count, kept in self.stored.items():
                if tuple(ddim_timesteps(len(self.alphas_cumprod), count, self.spacing, self.offset)) != kept:
                    raise UsageError(f"the engine stores timesteps for {count} steps that this runtime does not "
                                     f"reproduce for its {self.spacing!r} spacing; use --steps {count}")
        n = len(self.alphas_cumprod)
        if len(ts) != steps or not all(0 <= t < n for t in ts):
            # diffusers gives such lists for a few counts (trailing spacing ends some at t = -1), and indexing
            # ā with them would silently use another level, or fail without a word
            raise UsageError(f"{steps} steps give the timesteps {quoted(list(ts))} under this model's "
                             f"{self.spacing!r} spacing (offset {self.offset}), outside 0..{n - 1} or not {steps} "
                             "of them; choose another step count")
        levels = np.append(self.alphas_cumprod[list(ts)], np.float32(1.0)).astype(np.float32)
        return Schedule(tuple(ts), levels)

    def to_manifest(self) -> dict:
        return {
            "alphas_cumprod": [float(v) for v in self.alphas_cumprod],
            "timestep_spacing": self.spacing,
            "steps_offset": self.offset,
            f"timesteps_{DEFAULT_STEPS}": list(self.for_steps(DEFAULT_STEPS).timesteps),
        }

    @classmethod
    def from_manifest(cls, entry: dict) -> "NoiseSchedule":
        stored = {int(key.removeprefix("timesteps_")): tuple(int(t) for t in value)
                  for key, value in entry.items() if key.startswith("timesteps_")}
        return cls(np.asarray(entry["alphas_cumprod"], dtype=np.float32), entry["timestep_spacing"],
                   int(entry["steps_offset"]), stored)
