"""The short version of `elasticlm chaos` (loadtests/faults.py): Redis killed and one of two replicas
killed under a steady open-loop load, on the real stack (`elasticlm serve`: Ray Serve, HAProxy, two
replicas, redis-server), and nothing accepted is lost. The full scenarios are a benchmark
(docs/reliability.md); this one is light (20 req/s for 20 s) so that it fits CI's two cores."""

import importlib.util
import json
import subprocess
import sys

import pytest

pytest.importorskip("ray")
if importlib.util.find_spec("locust") is None:  # never imported here: it monkey-patches the process (gevent)
    pytest.skip("locust is not installed", allow_module_level=True)


def test_redis_and_replica_killed_under_load_lose_nothing(tmp_path):
    cmd = [sys.executable, "-m", "elastic_core.cli", "chaos", "--scenarios", "redis-kill,replica-kill",
           "--capacity-rps", "40", "--load-frac", "0.5", "--duration-s", "20", "--fault-at-s", "6",
           "--outage-s", "3", "--num-cpus", "2", "--run-dir", str(tmp_path / "runs"),
           "--out-dir", str(tmp_path / "results"), "--docs-dir", str(tmp_path / "docs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "results" / "faults.json").read_text())
    for name in ("redis-kill", "replica-kill"):
        a = doc["scenarios"][name]["analysis"]
        assert a["requests"] >= 300 and a["lost"] == 0, (name, a["lost"], a["lost_codes"])
        assert a["ok"] + a["shed"] == a["requests"]
    assert doc["scenarios"]["redis-kill"]["analysis"]["replicas_back_s"] <= 5      # depth shared again
    assert doc["scenarios"]["replica-kill"]["analysis"]["share_gone_s"] <= 3.25    # within the TTL
    assert (tmp_path / "docs" / "img" / "faults-replica-kill.png").stat().st_size > 10_000
    assert "| redis-kill |" in (tmp_path / "docs" / "reliability.md").read_text()
