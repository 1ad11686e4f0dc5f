"""The cluster's keys in etcd, through etcd's v3 JSON gateway (the ``etcd3gw`` client; README "Running a fleet").

Keys under ``/pals/<cluster>/`` (values are JSON objects, at most MAX_VALUE_BYTES):

| key | lease | written by | value |
|---|---|---|---|
| ``budget`` | none | palsctl | ``target_w``, ``from_w``, ``set_at_unix_s``, ``ramp_s`` |
| ``leader`` | leader's | the elected allocator | ``node``, ``lease`` |
| ``offer/<node>`` | node's | the node | ``floor_w``, ``ceiling_w``, ``points``, ``applied_w`` |
| ``applied/<node>`` | none | the node, after enforcing | ``budget_w`` |
| ``grant/<node>`` | none | the leader, one transaction per round | ``budget_w``, ``leader`` |
| ``alloc`` | none | the leader, in the same transaction | ``budget_w``, ``reserved_w``, ``at_unix_s`` |

Blocking calls (requests underneath): the agent runs them in a worker thread. Every request has a timeout; a
failed endpoint is skipped for the next one, and EtcdUnavailable says that none answered.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pals_daemon.cluster.plan import NodeView, Offer
from pals_daemon.errors import PalsError

log = logging.getLogger(__name__)

# A value larger than this is refused on read (a node's offer is ~0.5 KB; 64 KiB bounds what a broken or
# hostile writer can make every daemon parse each round).
MAX_VALUE_BYTES = 64 * 1024
# At most this many nodes are read per round (bounds a prefix read; 4096 x ~1 KB is 4 MB).
MAX_NODES = 4096
NODE_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")
MAX_CLUSTER_BUDGET_W = 1e9


class EtcdUnavailable(PalsError):
    """No etcd endpoint answered (network, TLS, timeout, or no quorum)."""


class EtcdRequestError(PalsError):
    """etcd refused a request (e.g. more operations in one transaction than its --max-txn-ops)."""


class ClusterRecordError(PalsError):
    """A record in etcd is malformed (skipped, logged)."""


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _prefix_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


@dataclass(frozen=True)
class Budget:
    """The cluster budget record."""

    target_w: float
    from_w: float | None = None
    set_at_unix_s: float = 0.0
    ramp_s: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    """Everything the allocator reads in one range request (one revision: a consistent view)."""

    revision: int
    budget: Budget | None
    leader: str | None
    nodes: Mapping[str, NodeView]


def _finite(value: Any, what: str, lo: float = 0.0, hi: float = MAX_CLUSTER_BUDGET_W) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ClusterRecordError(f"{what}: not a finite number")
    if not lo <= value <= hi:
        raise ClusterRecordError(f"{what}: {value} outside [{lo}, {hi}]")
    return float(value)


def decode_offer(doc: Any) -> Offer:
    """An offer record to an Offer (ClusterRecordError when malformed)."""
    if not isinstance(doc, dict):
        raise ClusterRecordError("offer: not an object")
    points = doc.get("points")
    if not isinstance(points, list) or not 1 <= len(points) <= 64:
        raise ClusterRecordError("offer: points must be a list of 1..64")
    try:
        return Offer(
            floor_w=_finite(doc.get("floor_w"), "floor_w"),
            ceiling_w=_finite(doc.get("ceiling_w"), "ceiling_w"),
            points=tuple(
                (_finite(p[0], "w"), _finite(p[1], "score", 0, 1e12), _finite(p[2], "tps", 0, 1e12))
                for p in points
                if isinstance(p, list) and len(p) == 3
            ),
        )
    except ValueError as exc:
        raise ClusterRecordError(str(exc)) from exc


def encode_offer(offer: Offer, applied_w: float | None) -> dict[str, Any]:
    """An Offer as its record."""
    return {
        "floor_w": offer.floor_w,
        "ceiling_w": offer.ceiling_w,
        "points": [list(p) for p in offer.points],
        "applied_w": applied_w,
    }


def decode_budget(doc: Any) -> Budget:
    """A budget record to a Budget (ClusterRecordError when malformed)."""
    if not isinstance(doc, dict):
        raise ClusterRecordError("budget: not an object")
    from_w = doc.get("from_w")
    return Budget(
        target_w=_finite(doc.get("target_w"), "target_w", 1.0),
        from_w=None if from_w is None else _finite(from_w, "from_w", 1.0),
        set_at_unix_s=_finite(doc.get("set_at_unix_s", 0.0), "set_at_unix_s", 0.0, 1e11),
        ramp_s=_finite(doc.get("ramp_s", 0.0), "ramp_s", 0.0, 86400.0),
    )


class EtcdStore:
    """The cluster's records through one of several etcd endpoints (the first that answers)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        cluster: str,
        timeout_s: float = 1.0,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
    ) -> None:
        try:
            import etcd3gw  # optional extra: pals-daemon[cluster]
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise PalsError("cluster mode needs the etcd client: pip install 'pals-daemon[cluster]'") from exc
        self.prefix = f"/pals/{cluster}/"
        self._clients = []
        for url in endpoints:
            parts = urlsplit(url)
            self._clients.append(
                etcd3gw.Etcd3Client(
                    host=parts.hostname or "localhost",
                    port=parts.port or 2379,
                    protocol=parts.scheme,
                    ca_cert=ca_file or None,
                    cert_key=key_file or None,
                    cert_cert=cert_file or None,
                    timeout=timeout_s,
                    api_path="/v3/",
                )
            )
        self._current = 0

    def close(self) -> None:
        """Close the HTTP sessions."""
        for c in self._clients:
            c.session.close()

    # ------------------------------------------------------------------ transport

    def _call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        from etcd3gw import exceptions as etcd_exc

        last: Exception | None = None
        for i in range(len(self._clients)):
            idx = (self._current + i) % len(self._clients)
            client = self._clients[idx]
            try:
                out = client.post(client.get_url(path), json=dict(body))
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError, OSError, ValueError) as exc:
                last = exc
                continue
            except etcd_exc.Etcd3Exception as exc:
                text = str(getattr(exc, "detail_text", "") or exc)[:300]
                if "no leader" in text or "timed out" in text or "unavailable" in text.lower():
                    last = exc  # this member has no quorum: another may
                    continue
                raise EtcdRequestError(f"etcd refused {path}: {text}") from exc
            self._current = idx
            return out if isinstance(out, dict) else {}
        raise EtcdUnavailable(f"no etcd endpoint answered {path}: {last}")

    def key(self, *parts: str) -> str:
        """The full key of ``parts`` under this cluster's prefix."""
        return self.prefix + "/".join(parts)

    @staticmethod
    def _decode_value(kv: Mapping[str, Any]) -> Any:
        raw = _unb64(kv.get("value", ""))
        if len(raw) > MAX_VALUE_BYTES:
            raise ClusterRecordError(f"value of {len(raw)} bytes over the {MAX_VALUE_BYTES} limit")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ClusterRecordError(f"not JSON: {exc}") from exc

    # ------------------------------------------------------------------ leases

    def grant_lease(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; its id."""
        out = self._call("/lease/grant", {"TTL": ttl_s})
        return int(out["ID"])

    def refresh_lease(self, lease_id: int) -> int:
        """Keep ``lease_id`` alive; the TTL it now has (<= 0: it has expired)."""
        out = self._call("/lease/keepalive", {"ID": lease_id})
        return int(out.get("result", {}).get("TTL", 0))

    def revoke_lease(self, lease_id: int) -> None:
        """Drop ``lease_id`` and its keys now (a clean exit: the node lapses at once, not after the TTL)."""
        self._call("/kv/lease/revoke", {"ID": lease_id})

    # ------------------------------------------------------------------ records

    def put(self, key: str, value: Mapping[str, Any], lease_id: int | None = None) -> None:
        """Write one JSON record (under ``lease_id`` when given)."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(json.dumps(value, separators=(",", ":")))}
        if lease_id:
            body["lease"] = lease_id
        self._call("/kv/put", body)

    def get(self, key: str) -> Any | None:
        """One JSON record, or None when absent."""
        out = self._call("/kv/range", {"key": _b64(key)})
        kvs = out.get("kvs") or []
        return self._decode_value(kvs[0]) if kvs else None

    def delete(self, key: str) -> None:
        """Remove one key."""
        self._call("/kv/deleterange", {"key": _b64(key)})

    def set_budget(self, budget: Budget) -> None:
        """Write the cluster budget record."""
        self.put(self.key("budget"), budget.__dict__)

    def get_budget(self) -> Budget | None:
        """The cluster budget record, None when none is set."""
        doc = self.get(self.key("budget"))
        return None if doc is None else decode_budget(doc)

    def grant_of(self, node: str) -> float | None:
        """This node's grant, None when the leader has written none."""
        doc = self.get(self.key("grant", node))
        if doc is None:
            return None
        if not isinstance(doc, dict):
            raise ClusterRecordError("grant: not an object")
        return _finite(doc.get("budget_w"), "grant budget_w", 1.0)

    def snapshot(self) -> Snapshot:
        """Budget, leader, and every node's offer, grant and applied budget, at one revision."""
        out = self._call(
            "/kv/range", {"key": _b64(self.prefix), "range_end": _prefix_end(self.prefix), "limit": 4 * MAX_NODES + 8}
        )
        revision = int(out.get("header", {}).get("revision", 0))
        budget: Budget | None = None
        leader: str | None = None
        offers: dict[str, Offer] = {}
        grants: dict[str, float] = {}
        applied: dict[str, float] = {}
        for kv in out.get("kvs") or []:
            key = _unb64(kv["key"]).decode(errors="replace")[len(self.prefix) :]
            try:
                value = self._decode_value(kv)
                kind, _, node = key.partition("/")
                if key == "budget":
                    budget = decode_budget(value)
                elif key == "leader":
                    leader = str(value.get("node")) if isinstance(value, dict) else None
                elif node and not NODE_NAME.fullmatch(node):
                    raise ClusterRecordError("bad node name")
                elif kind == "offer":
                    offers[node] = decode_offer(value)
                elif kind == "grant":
                    grants[node] = _finite(value.get("budget_w"), "grant", 1.0)
                elif kind == "applied":
                    applied[node] = _finite(value.get("budget_w"), "applied", 1.0)
            except (ClusterRecordError, AttributeError, TypeError) as exc:
                log.warning("cluster record %s skipped: %s", key, exc)
        names = set(offers) | set(grants) | set(applied)
        nodes = {n: NodeView(offers.get(n), grants.get(n), applied.get(n)) for n in sorted(names)}
        return Snapshot(revision, budget, leader, nodes)

    # ------------------------------------------------------------------ election and grants

    def campaign(self, node: str, lease_id: int) -> bool:
        """Become leader if nobody is (create-if-absent under our lease); True when we lead."""
        key = _b64(self.key("leader"))
        me = json.dumps({"node": node, "lease": lease_id})
        out = self._call(
            "/kv/txn",
            {
                "compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": 0}],
                "success": [{"request_put": {"key": key, "value": _b64(me), "lease": lease_id}}],
                "failure": [{"request_range": {"key": key}}],
            },
        )
        if out.get("succeeded"):
            return True
        try:
            kvs = out["responses"][0]["response_range"].get("kvs") or []
            return bool(kvs) and int(kvs[0].get("lease", 0)) == lease_id
        except (KeyError, IndexError, TypeError, ValueError):
            return False

    def resign(self, lease_id: int) -> None:
        """Give up leadership if we hold it (delete the key only while it carries our lease)."""
        key = _b64(self.key("leader"))
        self._call(
            "/kv/txn",
            {
                "compare": [{"key": key, "target": "LEASE", "result": "EQUAL", "lease": lease_id}],
                "success": [{"request_delete_range": {"key": key}}],
            },
        )

    def write_grants(
        self, node: str, lease_id: int, grants: Mapping[str, float], budget_w: float, reserved_w: float
    ) -> bool:
        """Every grant of a round in ONE transaction, applied only while our lease holds the leader key."""
        leader_key = _b64(self.key("leader"))
        now = time.time()
        ops = [
            {
                "request_put": {
                    "key": _b64(self.key("grant", n)),
                    "value": _b64(json.dumps({"budget_w": w, "leader": node, "at_unix_s": now})),
                }
            }
            for n, w in sorted(grants.items())
        ]
        ops.append(
            {
                "request_put": {
                    "key": _b64(self.key("alloc")),
                    "value": _b64(
                        json.dumps({"budget_w": budget_w, "reserved_w": reserved_w, "leader": node, "at_unix_s": now})
                    ),
                }
            }
        )
        out = self._call(
            "/kv/txn",
            {
                "compare": [{"key": leader_key, "target": "LEASE", "result": "EQUAL", "lease": lease_id}],
                "success": ops,
            },
        )
        return bool(out.get("succeeded"))
