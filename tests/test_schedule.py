"""Timesteps and levels (spec §3) against diffusers itself."""

import numpy as np
import pytest
from diffusers import DDIMScheduler

from revanon_rt.errors import UsageError
from revanon_rt.schedule import NoiseSchedule, ddim_timesteps
from revanon_rt.tiny import COMPVIS_SCHEDULER


@pytest.mark.parametrize("spacing, offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_numpy_timesteps_equal_diffusers_for_every_step_count(spacing, offset):
    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    for steps in range(1, 1001):
        scheduler.set_timesteps(steps)
        assert ddim_timesteps(1000, steps, spacing, offset) == scheduler.timesteps.tolist(), steps


def test_levels_follow_the_timesteps_and_end_at_one():
    scheduler = DDIMScheduler.from_config({k: v for k, v in COMPVIS_SCHEDULER.items() if not k.startswith("_")})
    noise = NoiseSchedule(scheduler.alphas_cumprod.numpy(), "leading", 0)
    sched = noise.for_steps(50)
    assert sched.timesteps[0] == 980 and sched.timesteps[-1] == 0
    assert sched.levels.dtype == np.float32
    assert [float(v) for v in sched.levels[:-1]] == [float(scheduler.alphas_cumprod[t]) for t in sched.timesteps]
    assert sched.levels[-1] == 1.0
    round_trip = NoiseSchedule.from_manifest(noise.to_manifest())
    assert np.array_equal(round_trip.alphas_cumprod, noise.alphas_cumprod)
    assert round_trip.for_steps(7).timesteps == noise.for_steps(7).timesteps


def test_a_runtime_uses_the_stored_timesteps_and_trusts_its_mirror_only_where_it_reproduces_them():
    scheduler = DDIMScheduler.from_config({k: v for k, v in COMPVIS_SCHEDULER.items() if not k.startswith("_")})
    entry = NoiseSchedule(scheduler.alphas_cumprod.numpy(), "leading", 0).to_manifest()
    scheduler.set_timesteps(50)
    assert entry["timesteps_50"] == scheduler.timesteps.tolist()
    assert NoiseSchedule.from_manifest(entry).for_steps(7).timesteps == tuple(range(852, -1, -142))

    # a table that the mirror cannot reproduce (as if diffusers had changed its spacing): used for
    # its own step count, and every other count is refused instead of silently recomputed
    foreign = {**entry, "timesteps_50": [t + 1 for t in entry["timesteps_50"]]}
    engine_schedule = NoiseSchedule.from_manifest(foreign)
    assert engine_schedule.for_steps(50).timesteps == tuple(foreign["timesteps_50"])
    assert engine_schedule.for_steps(50).levels[0] == scheduler.alphas_cumprod[981]
    with pytest.raises(UsageError, match="use --steps 50"):
        engine_schedule.for_steps(7)


def test_a_step_count_whose_timesteps_leave_the_table_is_refused():
    """diffusers ends 62 trailing schedules at t = -1, and leading ones with offset 1 reach t = 1000 at 1000
    steps: ā has no such entry, and indexing would use another level or crash."""
    alphas = np.linspace(0.9999, 0.005, 1000).astype(np.float32)
    assert ddim_timesteps(1000, 61, "trailing", 0)[-1] == -1
    for spacing, offset, steps in (("trailing", 0, 61), ("leading", 1, 1000)):
        with pytest.raises(UsageError, match=f"{steps} steps give the timesteps .* outside 0..999"):
            NoiseSchedule(alphas, spacing, offset).for_steps(steps)
    assert len(NoiseSchedule(alphas, "trailing", 0).for_steps(60).timesteps) == 60
