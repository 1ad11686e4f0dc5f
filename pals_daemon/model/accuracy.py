"""Leave-one-point-out accuracy of the performance model on a profile's measured points (MAPE)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from pals_daemon.model.perf_model import PerfModel
from pals_daemon.model.profile import Profile, ProfilePoint

METHODS = ("dvfs-fit", "bilinear")


@dataclass(frozen=True)
class LooPoint:
    """One dropped point: measured and predicted throughput/power, and whether it was extrapolation."""

    model: str
    cap_w: float
    batch: int
    edge: bool
    tokens_per_s: float
    predicted_tokens_per_s: float
    gpu_power_w: float
    predicted_gpu_power_w: float

    @property
    def tput_ape(self) -> float:
        """Absolute percentage error of throughput (%)."""
        return 100.0 * abs(self.predicted_tokens_per_s / self.tokens_per_s - 1.0)

    @property
    def power_ape(self) -> float:
        """Absolute percentage error of per-GPU power (%)."""
        return 100.0 * abs(self.predicted_gpu_power_w / self.gpu_power_w - 1.0)


def _bilinear_hole(rest: list[ProfilePoint], dropped: ProfilePoint) -> tuple[float, float]:
    # The previous PerfModel interpolated linearly in cap on the measured grid and clamped outside it;
    # with the dropped cell missing, that is linear interpolation over the batch's remaining caps.
    same = sorted((p for p in rest if p.batch == dropped.batch), key=lambda p: p.cap_w)
    caps = [p.cap_w for p in same]
    tput = float(np.interp(dropped.cap_w, caps, [p.tokens_per_s for p in same]))
    power = float(np.interp(dropped.cap_w, caps, [p.gpu_power_w for p in same]))
    return tput, min(power, dropped.cap_w)


def leave_one_out(profile: Profile, method: str = "dvfs-fit") -> list[LooPoint]:
    """Drop each point in turn, rebuild the model from the rest, and predict the dropped point."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    caps, batches = profile.caps_w, profile.batches
    out = []
    for k, p in enumerate(profile.points):
        rest = [q for i, q in enumerate(profile.points) if i != k]
        if method == "dvfs-fit":
            t, w = PerfModel.from_points(profile, rest).predict(p.cap_w, p.batch)
            tput, power = float(t), float(w)
        else:
            tput, power = _bilinear_hole(rest, p)
        edge = p.cap_w in (caps[0], caps[-1]) or p.batch in (batches[0], batches[-1])
        out.append(LooPoint(profile.model, p.cap_w, p.batch, edge, p.tokens_per_s, tput, p.gpu_power_w, power))
    return out


def summarize(points: Iterable[LooPoint]) -> dict[str, dict[str, float]]:
    """MAPE (%) of throughput and power over all, interior and edge points."""
    pts = list(points)
    out: dict[str, dict[str, float]] = {}
    for name, sel in (("all", pts), ("interior", [p for p in pts if not p.edge]), ("edge", [p for p in pts if p.edge])):
        if sel:
            out[name] = {
                "n": len(sel),
                "tput_mape_pct": float(np.mean([p.tput_ape for p in sel])),
                "power_mape_pct": float(np.mean([p.power_ape for p in sel])),
            }
    return out


def accuracy_report(profiles: Iterable[Profile], methods: Iterable[str] = METHODS) -> dict[str, object]:
    """Per method: overall and per-model summaries plus every dropped point (JSON-ready)."""
    profiles = list(profiles)
    report: dict[str, object] = {}
    for method in methods:
        per_model = {p.model: leave_one_out(p, method) for p in profiles}
        every = [x for pts in per_model.values() for x in pts]
        report[method] = {
            "overall": summarize(every),
            "models": {m: summarize(pts) for m, pts in per_model.items()},
            "points": [{**asdict(x), "tput_ape_pct": x.tput_ape, "power_ape_pct": x.power_ape} for x in every],
        }
    return report
