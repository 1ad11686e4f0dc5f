"""deploy/kubernetes/: every built-in object validates against the Kubernetes 1.33 schemas (kubernetes-validate,
offline, strict: unknown fields are errors), and the wiring holds: least privilege for NVML, the socket
directory shared with vLLM through the pals group, state on the host, an orderly preStop, a config the daemon
accepts. Not run on a real cluster (README "Running a fleet")."""

from __future__ import annotations

import pathlib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pals_daemon.config import load_config
from pals_daemon.errors import ConfigError

DIR = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
K8S_VERSION = "1.33"
CRDS = {"monitoring.coreos.com/v1": {"PodMonitor"}, "kustomize.config.k8s.io/v1beta1": {"Kustomization"}}
ENGINE_GID = 2000


def _docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def _by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in _docs() if d["kind"] == kind]
    return doc


def _builtin(doc: dict[str, Any]) -> bool:
    # Custom resources have no schema in kubernetes-validate: checked field by field below.
    return doc["kind"] not in CRDS.get(doc["apiVersion"], set())


@pytest.mark.parametrize(
    ("name", "doc"), [d for d in _docs() if _builtin(d[1])], ids=lambda x: x if isinstance(x, str) else x["kind"]
)
def test_validates_against_kubernetes_schemas(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_manifest_is_checked() -> None:
    kinds = {d["kind"] for _, d in _docs()}
    assert kinds == {"Namespace", "ConfigMap", "DaemonSet", "Deployment", "PodMonitor", "Kustomization"}


def test_schema_validation_rejects_a_broken_manifest() -> None:
    bad = _by_kind("DaemonSet")
    bad = {**bad, "spec": {**bad["spec"], "template": {**bad["spec"]["template"], "spec": {
        **bad["spec"]["template"]["spec"], "hostNetwrok": True}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_daemonset_is_privileged_only_as_far_as_nvml_needs() -> None:
    spec = _by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["automountServiceAccountToken"] is False  # no API access, no RBAC
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN", "CHOWN"]}  # as the systemd unit
    env = {e["name"]: e for e in c["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["PALS_CLUSTER_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "kill -TERM 1" in " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert volumes["run"]["hostPath"]["path"] == "/run/pals" and mounts["run"] == "/run/pals"
    assert volumes["state"]["hostPath"]["path"] == "/var/lib/pals" and mounts["state"] == "/var/lib/pals"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    annotations = _by_kind("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])


def test_configmap_is_a_config_the_daemon_accepts(tmp_path: pathlib.Path) -> None:
    text = _by_kind("ConfigMap")["data"]["pals.toml"]
    path = tmp_path / "pals.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config({}, env={"PALS_CLUSTER_NODE": "gpu-node-1"}, config_path=str(path))
    # Only the TLS files (a Secret on the cluster) are missing here: every key and value is valid.
    assert all("is not a file" in p for p in err.value.problems), err.value.problems
    assert len(err.value.problems) == 3
    (container,) = _by_kind("DaemonSet")["spec"]["template"]["spec"]["containers"]
    cfg_mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert cfg_mounts["etcd-client"] == "/etc/pals/etcd"
    assert 'runtime_dir = "/run/pals"' in text and 'state_dir = "/var/lib/pals"' in text
    assert 'metrics_port = 10400' in text and 'engine_socket_group = "pals"' in text


def test_vllm_example_reaches_the_engine_socket_through_the_group() -> None:
    spec = _by_kind("Deployment")["spec"]["template"]["spec"]
    assert ENGINE_GID in spec["securityContext"]["supplementalGroups"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    (c,) = spec["containers"]
    assert "--scheduler-cls=pals_daemon.vllm.Scheduler" in c["args"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PALS_ENGINE_SOCKET"] == "/run/pals/engine.sock"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["pals-run"]["hostPath"]["path"] == "/run/pals"


def test_podmonitor_scrapes_the_metrics_port_and_kustomization_lists_files() -> None:
    pm = _by_kind("PodMonitor")
    ds = _by_kind("DaemonSet")
    assert pm["spec"]["selector"]["matchLabels"] == ds["spec"]["selector"]["matchLabels"]
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    for res in _by_kind("Kustomization")["resources"]:
        assert (DIR / res).is_file(), res
