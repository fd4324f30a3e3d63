"""What Serve's proxy health-check period costs and buys (issue 31): the single local proxy killed.

    .venv/bin/python benchmarks/proxy_health.py            # ~6 min on 2 cores, a quiet machine

Ray Serve 2.60's controller asks every proxy actor whether it is healthy every
``RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S`` (default 10 s; the HAProxy manager answers by asking HAProxy
``show info`` on its admin socket; the fallback Python proxy answers from its own loop) and replaces a proxy
after 3 failures in a row (``PROXY_HEALTH_CHECK_UNHEALTHY_THRESHOLD``, not configurable): a dead HAProxy
is replaced 2-3 periods after it died, plus the time a new manager actor and HAProxy take to start and
receive their routes. A failure is a ``False`` answer or no answer within
``RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S`` (``SERVE_ENV`` raises it with the shorter period, so that a proxy
stalled but alive is replaced no sooner than with Serve's defaults). For each period (Serve's default and
``deployments/local.py:SERVE_ENV``'s, with the time-out that goes with each), on the stack
``elasticlm serve`` runs (one replica): the CPU of the processes that take part in the checks, idle, per
second of wall time (from /proc: ``loadtests/cpu.py``), then HAProxy SIGKILLed ``--kills`` times and the
seconds until ``/health`` answers 200 again through the restarted one (probed every 50 ms).

Writes ``benchmarks/results/proxy_health.json`` and the "proxy-health" section of ``docs/reliability.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deployments.local import SERVE_ENV  # noqa: E402
from loadtests.cpu import cpu_by_process, cpu_delta  # noqa: E402
from loadtests.experiment import Experiment, machine  # noqa: E402
from loadtests.faults import RELIABILITY_HEADER  # noqa: E402
from loadtests.scenarios import kill_proxy  # noqa: E402
from loadtests.stack import BaseConfig, ServeDeployment, serve_variant, started  # noqa: E402

PERIOD_ENV, TIMEOUT_ENV = "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"
# (period, time-out): Serve's defaults, ours
SETTINGS = ((10.0, 10.0), (float(SERVE_ENV[PERIOD_ENV]), float(SERVE_ENV[TIMEOUT_ENV])))
CHECKING = ("ServeController", "HAProxyManager", "ProxyActor", "haproxy")  # the processes in a health check


def answering_again_s(url: str, since: float, timeout_s: float = 90.0) -> tuple[float | None, dict]:
    """Seconds from ``since`` until ``url`` answers 200, probed every 50 ms; and the other outcomes seen."""
    import httpx

    seen: dict[str, int] = {}
    with httpx.Client(timeout=1.0) as client:
        while time.time() - since < timeout_s:
            try:
                code = str(client.get(url).status_code)
            except httpx.HTTPError as e:
                code = type(e).__name__
            if code == "200":
                return round(time.time() - since, 2), seen
            seen[code] = seen.get(code, 0) + 1
            time.sleep(0.05)
    return None, seen


def measure_period(period: float, timeout: float, args, base: BaseConfig, log=print) -> dict:
    cfg = serve_variant(base.serve, "elastic-noauto", base.sublms, fixed_replicas=1)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / f"config.period-{period:g}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # `elasticlm serve` lets the environment win over SERVE_ENV
    os.environ[PERIOD_ENV], os.environ[TIMEOUT_ENV] = f"{period:g}", f"{timeout:g}"
    deployment = ServeDeployment(cfg_path, base.target_ms(), run_dir / f"period-{period:g}.server.log", args.num_cpus)
    with started(deployment, f"period {period:g} s", log):
        time.sleep(args.settle_s)
        before, t0 = cpu_by_process([deployment.proc.pid]), time.monotonic()
        time.sleep(args.idle_s)
        spent, elapsed = cpu_delta(before, cpu_by_process([deployment.proc.pid])), time.monotonic() - t0
        idle_ms = {kind: round(1000 * spent.get(kind, 0.0) / elapsed, 2) for kind in CHECKING}
        log(f"[period {period:g} s] idle CPU ms/s: {idle_ms}")
        kills = []
        for _ in range(args.kills):
            killed_at = time.time()
            kill_proxy(deployment, args)
            back, seen = answering_again_s(deployment.url + "/health", killed_at)
            log(f"[period {period:g} s] answering again after {back} s ({seen})")
            kills.append({"answering_again_s": back, "meanwhile": seen})
            time.sleep(args.between_s)
    return {"period_s": period, "timeout_s": timeout, "idle_cpu_ms_per_s": idle_ms,
            "idle_total_ms_per_s": round(sum(idle_ms.values()), 2), "kills": kills}


class ProxyHealth(Experiment):
    header, section = RELIABILITY_HEADER, "proxy-health"

    def __init__(self, args, log=print):
        self.args, self.log, self.out = args, log, Path(args.out)
        self.page = Path(args.docs_dir) / "reliability.md"

    def run(self) -> list[dict]:
        base = BaseConfig.read(self.args.config)
        return [measure_period(p, t, self.args, base, self.log) for p, t in SETTINGS]

    def analyze(self, measured: list[dict]) -> dict:
        return {"command": " ".join(["python benchmarks/proxy_health.py", *sys.argv[1:]]),
                "date": time.strftime("%Y-%m-%d"), "machine": machine(with_platform=False), "periods": measured}

    def targets(self, doc: dict) -> list[dict]:
        ours = doc["periods"][-1]["kills"]
        worst = max((k["answering_again_s"] or float("inf")) for k in ours)
        return [{"name": "single proxy killed: answering again within 5 s (worst of the kills)",
                 "met": worst <= 5.0, "figure": worst}]

    def plot(self, doc: dict) -> None:
        pass  # a table says it all

    def markdown(self, doc: dict) -> str:
        rows = ["| period / time-out (s) | idle CPU, ms per s: " + " / ".join(CHECKING) + " (total) | "
                "answering again after each kill (s) | meanwhile (probes every 50 ms) |", "|---|---|---|---|"]
        for p in doc["periods"]:
            cpu = " / ".join(f"{p['idle_cpu_ms_per_s'][k]:g}" for k in CHECKING)
            backs = ", ".join(str(k["answering_again_s"]) for k in p["kills"])
            seen = "; ".join(", ".join(f"{c}: {n}" for c, n in k["meanwhile"].items()) for k in p["kills"])
            rows.append(f"| {p['period_s']:g} / {p['timeout_s']:g} | {cpu} ({p['idle_total_ms_per_s']:g}) | {backs} "
                        f"| {seen} |")
        targets = "\n".join(f"- {'met' if t['met'] else '**missed**'}: {t['name']} ({t['figure']})"
                            for t in doc["targets"])
        return (f"Command: `{doc['command']}` ({doc['machine']}, {doc['date']}): `elasticlm serve`'s stack, one "
                f"replica, idle; then HAProxy SIGKILLed. `{PERIOD_ENV}` / `{TIMEOUT_ENV}`: Serve's defaults, "
                "then `SERVE_ENV`'s.\n\n"
                + "\n".join(rows) + "\n\nTargets:\n" + targets)

    def title(self, doc: dict) -> str:
        return "The single proxy killed: Serve's health-check period"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--settle-s", type=float, default=10.0, help="idle before the CPU is measured")
    p.add_argument("--idle-s", type=float, default=30.0, help="how long the idle CPU is measured")
    p.add_argument("--between-s", type=float, default=5.0, help="pause after the stack answers again")
    p.add_argument("--config", default=str(ROOT / "cluster" / "config.local.yaml"))
    p.add_argument("--num-cpus", type=int)
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "proxy-health"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "proxy_health.json"))
    p.add_argument("--docs-dir", default=str(ROOT / "docs"))
    args = p.parse_args()
    ProxyHealth(args).execute()


if __name__ == "__main__":
    main()
