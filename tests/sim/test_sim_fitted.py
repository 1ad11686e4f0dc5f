"""The fitted physics as data: complete, with provenance that matches the files it cites, and refittable."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pals_daemon.sim import a100, calibration, fitted, h100
from pals_daemon.sim.catalogue import known_models
from pals_daemon.sim.hardware import H100_SXM5

REPO = Path(__file__).resolve().parents[2]


def _doc(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    ("path", "csv"),
    [(fitted.A100_FITTED_JSON, a100.DEFAULT_SWEEP_CSV), (fitted.H100_FITTED_JSON, h100.default_mlenergy_csv())],
)
def test_provenance_names_the_source_csv_and_its_hash(path: Path, csv: Path) -> None:
    doc = _doc(path)
    assert doc["schema"] == fitted.SCHEMA
    assert doc["about"].startswith("MODELLED")
    assert doc["fitted_on"][:4].isdigit()
    assert {"function", "method", "command"} <= set(doc["fit"])
    assert (REPO / doc["source"]["csv"]).resolve() == Path(csv).resolve()
    # A changed sweep must be refitted: the hash ties the constants to the rows they were fitted to.
    assert doc["source"]["sha256"] == hashlib.sha256(Path(csv).read_bytes()).hexdigest()
    assert doc["source"]["rows"]


def test_every_known_model_has_fitted_physics_and_its_stored_residuals() -> None:
    doc = _doc(fitted.A100_FITTED_JSON)
    assert [e["model"] for e in doc["entries"]] == known_models()
    for e in doc["entries"]:
        ph = fitted.a100_physics(e["model"])
        assert ph is not None
        assert e["residuals"] == calibration.a100_physics_errors(ph, e["model"])
    doc = _doc(fitted.H100_FITTED_JSON)
    assert sorted((e["model_id"], e["num_gpus"]) for e in doc["entries"]) == h100.known_h100_models()
    for e in doc["entries"]:
        ph = fitted.h100_physics(e["model_id"], e["num_gpus"])
        assert ph is not None and ph.alpha == fitted.H100_ALPHA and ph.f_min == fitted.H100_F_MIN
        sw = h100.read_h100_sweep(e["model_id"], e["num_gpus"])
        assert e["points"] == sw.batch.size
        assert e["residuals"] == calibration.h100_physics_errors(ph, sw)


def _write(tmp_path: Path, doc: object) -> Path:
    p = tmp_path / "fit.json"
    p.write_text(json.dumps(doc))
    return p


def test_a_malformed_file_is_refused_naming_it(tmp_path: Path) -> None:
    good = _doc(fitted.A100_FITTED_JSON)
    keys = ("model",)
    assert len(fitted.read_fitted(_write(tmp_path, good), fitted.A100_FITTED_FIELDS, keys)) == len(known_models())
    cases = []
    missing = json.loads(json.dumps(good))
    del missing["entries"][1]["physics"]["alpha"]
    cases.append((missing, "entry 1"))
    nan = json.loads(json.dumps(good))
    nan["entries"][0]["physics"]["p_sm_w"] = "510"
    cases.append((nan, "p_sm_w"))
    cases.append(({**good, "schema": 99}, "schema-1"))
    nokey = json.loads(json.dumps(good))
    del nokey["entries"][2]["model"]
    cases.append((nokey, "entry 2"))
    for doc, words in cases:
        with pytest.raises(fitted.FittedDataError, match=words) as e:
            fitted.read_fitted(_write(tmp_path, doc), fitted.A100_FITTED_FIELDS, keys)
        assert "fit.json" in str(e.value)
    (tmp_path / "fit.json").write_text("{not json")
    with pytest.raises(fitted.FittedDataError, match="fit.json"):
        fitted.read_fitted(tmp_path / "fit.json", fitted.A100_FITTED_FIELDS, keys)
    p = tmp_path / "bad.json"
    p.write_text(
        json.dumps({**good, "entries": [{"model": "x", "physics": {k: math.inf for k in fitted.A100_FITTED_FIELDS}}]})
    )
    with pytest.raises(fitted.FittedDataError, match="not finite"):
        fitted.read_fitted(p, fitted.A100_FITTED_FIELDS, keys)


def _sim_calibration():  # noqa: ANN202 - the bench script as a module
    spec = importlib.util.spec_from_file_location("sim_calibration", REPO / "bench" / "sim_calibration.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_refit_writes_data_files_that_match_the_committed_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench/sim_calibration.py --refit --write`` writes the data files; a fresh fit predicts what they do.

    The fits are not unique in their parameters (few points, near-degenerate terms), so the comparison is of
    what the physics predicts at every measured point: step time and power within 1%.
    """
    monkeypatch.setattr(fitted, "A100_FITTED_JSON", tmp_path / "a100.json")
    monkeypatch.setattr(fitted, "H100_FITTED_JSON", tmp_path / "h100.json")
    assert _sim_calibration().main(["--refit", "--write"]) == 0
    new_a = fitted.read_fitted(tmp_path / "a100.json", fitted.A100_FITTED_FIELDS, ("model",))
    assert [e["model"] for e in new_a] == known_models()
    for e in new_a:
        caps, batches, _, _, _ = a100.read_a100_sweep(e["model"])
        cc, bb = np.meshgrid(np.array(caps), np.array(batches, float), indexing="ij")
        committed = fitted.a100_physics(e["model"])
        assert committed is not None
        fresh = dataclasses.replace(committed, **e["physics"])
        t_new, p_new, _ = fresh.decode(bb.ravel(), cc.ravel())
        t_old, p_old, _ = committed.decode(bb.ravel(), cc.ravel())
        assert np.abs(t_new / t_old - 1).max() < 0.01, e["model"]
        assert np.abs(p_new / p_old - 1).max() < 0.01, e["model"]
    new_h = fitted.read_fitted(tmp_path / "h100.json", fitted.H100_FITTED_FIELDS, ("model_id", "num_gpus"))
    assert len(new_h) == len(h100.known_h100_models())
    for e in new_h:
        committed = fitted.h100_physics(e["model_id"], e["num_gpus"])
        assert committed is not None
        fresh = dataclasses.replace(committed, **e["physics"])
        b = h100.read_h100_sweep(e["model_id"], e["num_gpus"]).batch
        c = np.full_like(b, H100_SXM5.max_limit_w)
        assert np.abs(fresh.decode(b, c)[0] / committed.decode(b, c)[0] - 1).max() < 0.01, e
        assert np.abs(fresh.decode(b, c)[1] / committed.decode(b, c)[1] - 1).max() < 0.01, e
