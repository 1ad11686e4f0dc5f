"""The MODELLED clock dimension of the H100 profiles: throughput and power under a locked SM clock.

No public sweep measures H100 decode under locked clocks, so each clock point scales the profile's measured
700 W point by the ratio the fitted decode physics gives between the locked clock and the top clock at that
batch (:meth:`pals_daemon.sim.physics.DecodePhysics.decode`, constants in pals_daemon/sim/data/fitted/
h100_physics.json, fitted to the same ML.ENERGY sweep; the clock response itself is modelled: memory-bound time
is clock-insensitive above f_knee, clock-bound time scales with 1 / clock, SM power with clock ** alpha; see
pals_daemon/sim/fitted.py H100_CORE_MEM_SHARE for what it is calibrated against). The simulator uses the same
physics, so in simulation the planner's clock prior is off only by the truth's residual table and workload mix;
on a real GPU, measured clock points should replace them (``palsctl profile ENGINE ... --clocks MHZ,...`` measures
them on the live engine: pals_daemon/server/profiler.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from pals_daemon.model.profile import ProfilePoint

# Modelled grid: the top clock down to about a third of it in 150 MHz steps (every value a multiple of the 15 MHz
# step of H100's supported-clock list; below ~630 MHz decode leaves its memory-bound regime, f_knee ~0.29).
H100_PROFILE_CLOCKS_MHZ = (1980, 1830, 1680, 1530, 1380, 1230, 1080, 930, 780, 630)
_DECIMALS = 3


def h100_clock_points(
    model_id: str, num_gpus: int, cap_w: float, measured: Sequence[tuple[int, float, float, float]]
) -> list[ProfilePoint]:
    """Clock points at ``cap_w`` from the measured (batch, tokens/s, per-GPU W, ITL ms) points; [] without physics.

    Every point is ``modelled``; at the top clock it repeats the measured values (an unlocked GPU runs there).
    """
    # Imported here: the simulator's physics is only needed to generate profiles, never to load them.
    from pals_daemon.sim.fitted import h100_physics
    from pals_daemon.sim.hardware import H100_SXM5

    ph = h100_physics(model_id, num_gpus)
    if ph is None:
        return []
    top = float(H100_SXM5.max_sm_clock_mhz)
    out = []
    for clock in H100_PROFILE_CLOCKS_MHZ:
        for batch, tput, power_w, itl_ms in measured:
            t0, p0, _ = ph.decode(float(batch), cap_w)
            t1, p1, _ = ph.decode(float(batch), cap_w, clock / top)
            slow, draw = float(t1 / t0), float(p1 / p0)
            out.append(
                ProfilePoint(
                    cap_w=cap_w,
                    batch=batch,
                    tokens_per_s=round(tput / slow, _DECIMALS),
                    gpu_power_w=round(power_w * draw, _DECIMALS),
                    tpot_ms=round(itl_ms * slow, _DECIMALS),
                    modelled=True,
                    clock_mhz=clock,
                )
            )
    return out
