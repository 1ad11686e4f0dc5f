"""The fitted decode physics, kept as data with its provenance (pals_daemon/sim/data/fitted/*.json).

MODELLED: every constant in these files is a least-squares fit of :class:`~pals_daemon.sim.physics.DecodePhysics`
to a measured sweep, not a measurement. Each file records what it was fitted to (source CSV, its SHA-256, which
rows), how (the fitting function and method), when, and the residuals of the physics alone at the measured points;
``python bench/sim_calibration.py --refit --write`` refits and rewrites them (:func:`write_fitted`). Cited
constants (idle power, expert counts, top-k) come from the hardware profile and the model catalogue, not the file.

H100: the ML.ENERGY sweeps hold no cap dimension, so alpha (SM power vs. clock) and f_knee are transferred from the
A100 fits (their median) and f_min is a modelled floor; only the other fields are fitted per (model, GPU count).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pals_daemon.sim.catalogue import canonical_model_name, h100_arch, model_spec
from pals_daemon.sim.hardware import A100_SXM4, H100_SXM5
from pals_daemon.sim.physics import DecodePhysics, physics_fields

FITTED_DIR = Path(__file__).resolve().parent / "data" / "fitted"
A100_FITTED_JSON = FITTED_DIR / "a100_physics.json"
H100_FITTED_JSON = FITTED_DIR / "h100_physics.json"
# Bumped when the layout of the files changes.
SCHEMA = 1
# The DecodePhysics fields each file holds per entry: all but the cited ones (hardware profile, catalogue), and for
# H100 also not those transferred from the A100 fits or modelled (see the module).
_CITED = ("idle_w", "num_experts", "top_k")
# Set per GPU kind where the physics is built, not fitted (see H100_CORE_MEM_SHARE).
_NOT_FITTED = ("core_mem_share",)
_H100_NOT_FITTED = ("alpha", "f_knee", "f_min")
A100_FITTED_FIELDS = tuple(n for n in physics_fields() if n not in _CITED + _NOT_FITTED)
H100_FITTED_FIELDS = tuple(n for n in A100_FITTED_FIELDS if n not in _H100_NOT_FITTED)
H100_F_MIN = 0.17  # modelled: about 345 of 1980 MHz
# Modelled (no per-clock H100 sweep is public): the SMs' share of the memory-bound decode power, which a lower
# clock cuts (DecodePhysics.core_mem_share). 0.5 makes the best decode energy saving a locked clock gives at
# <= 10% longer steps, over the 18 H100 sweeps at batch 8-64, range from 4% to 34% (median 20%): the published
# clock-locking results are "up to 32%" of decode energy on H200 (arXiv 2605.11999) and "up to 42% for 1-6%
# latency" on A100/H100 (Maliakel et al., arXiv 2501.08219). The unlocked truth at the measured (700 W) points is
# unchanged (the residual table reproduces them); only clocks below the top, by lock or by a binding cap, see it.
H100_CORE_MEM_SHARE = 0.5


class FittedDataError(ValueError):
    """A fitted-physics file is missing, malformed, or lacks a field."""


def _finite_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_fitted(path: Path, fields: tuple[str, ...], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """The entries of a fitted-physics file, each checked to hold ``keys`` and a finite number per field."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FittedDataError(f"{path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("entries"), list):
        raise FittedDataError(f"{path}: not a schema-{SCHEMA} fitted-physics file")
    for i, entry in enumerate(doc["entries"]):
        phys = entry.get("physics") if isinstance(entry, dict) else None
        if not isinstance(phys, dict) or any(k not in entry for k in keys) or set(phys) != set(fields):
            raise FittedDataError(f"{path}: entry {i} must hold {list(keys)} and physics fields {list(fields)}")
        bad = [k for k, v in phys.items() if not _finite_number(v)]
        if bad:
            raise FittedDataError(f"{path}: entry {i}: physics fields {bad} are not finite numbers")
    entries: list[dict[str, Any]] = doc["entries"]
    return entries


def fitted_document(
    *, source: Mapping[str, Any], fit: Mapping[str, Any], fitted_on: str, entries: list[dict[str, Any]]
) -> dict[str, Any]:
    """A fitted-physics file's content: provenance, then one entry per fit (physics fields and residuals)."""
    return {
        "schema": SCHEMA,
        "about": "MODELLED: DecodePhysics fitted to a measured sweep (pals_daemon/sim/fitted.py); not measurements.",
        "source": dict(source),
        "fit": dict(fit),
        "fitted_on": fitted_on,
        "entries": entries,
    }


def physics_fields(ph: DecodePhysics, fields: tuple[str, ...]) -> dict[str, float]:
    """The fitted fields of ``ph``, 6 significant digits (more would claim a precision the fit does not have)."""
    return {n: float(f"{float(getattr(ph, n)):.6g}") for n in fields}


def write_fitted(path: Path, doc: Mapping[str, Any]) -> None:
    """Write a fitted-physics file (atomically: a reader never sees half a file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


_A100_PHYSICS: dict[str, dict[str, float]] = {
    e["model"]: dict(e["physics"]) for e in read_fitted(A100_FITTED_JSON, A100_FITTED_FIELDS, ("model",))
}
_H100_PHYSICS: dict[tuple[str, int], dict[str, float]] = {
    (e["model_id"], int(e["num_gpus"])): dict(e["physics"])
    for e in read_fitted(H100_FITTED_JSON, H100_FITTED_FIELDS, ("model_id", "num_gpus"))
}
H100_ALPHA = float(np.median([v["alpha"] for v in _A100_PHYSICS.values()]))  # modelled: median of the A100 fits
H100_F_KNEE = float(np.median([v["f_knee"] for v in _A100_PHYSICS.values()]))  # modelled: median of the A100 fits


def a100_physics(model_name: str) -> DecodePhysics | None:
    """The fitted A100 decode physics of ``model_name`` (None if it has no fitted constants)."""
    name = canonical_model_name(model_name)
    fitted = _A100_PHYSICS.get(name)
    if fitted is None:
        return None
    spec = model_spec(name)
    return DecodePhysics(idle_w=A100_SXM4.idle_power_w, num_experts=spec.num_experts, top_k=spec.top_k, **fitted)


def h100_physics(model_id: str, num_gpus: int) -> DecodePhysics | None:
    """The fitted H100 decode physics of (``model_id``, ``num_gpus``), or None if it has no constants."""
    arch = h100_arch(model_id)
    fitted = _H100_PHYSICS.get((model_id, num_gpus))
    if arch is None or fitted is None:
        return None
    return DecodePhysics(
        idle_w=H100_SXM5.idle_power_w,
        num_experts=arch[3],
        top_k=arch[4],
        alpha=H100_ALPHA,
        f_knee=H100_F_KNEE,
        f_min=H100_F_MIN,
        core_mem_share=H100_CORE_MEM_SHARE,
        **fitted,
    )
