"""Ports handed out to the stack's servers (``deployments/ports.py``) and to Serve's HAProxy
(``deployments/local.py``): a port found free here is bound seconds to minutes later, so it must come from
where nothing takes ports unasked, and each stack in one process gets its own."""

import os
import socket

import pytest

from deployments import local
from deployments.ports import free_port, port_is_free, unclaimed_ports

pytestmark = pytest.mark.fast


def test_ports_come_from_below_the_ephemeral_range_and_above_rays_worker_ports():
    unclaimed = unclaimed_ports()
    low, _ = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    assert unclaimed.start == 20000 and unclaimed.stop == low  # Ray's workers: 10002-19999
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(p in unclaimed for p in ports)


def test_a_preferred_port_is_kept_when_free_and_replaced_when_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        assert not port_is_free(busy)
        assert free_port(busy) != busy
    preferred = free_port()
    assert free_port(preferred) != preferred  # handed out once already in this process: never twice


def test_the_os_picks_where_no_range_is_left(monkeypatch, tmp_path):
    squeezed = tmp_path / "ip_local_port_range"
    squeezed.write_text("10000\t60999\n")
    monkeypatch.setattr("deployments.ports.EPHEMERAL_RANGE", squeezed)
    assert len(unclaimed_ports()) == 0
    assert free_port() > 0


def test_each_stack_gets_fresh_haproxy_ports_and_the_users_settings_win(monkeypatch):
    # a copy of the environment: what this test exports must not reach the stacks of later tests
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_HAPROXY")}
    monkeypatch.setattr(local.os, "environ", {**environ, "RAY_SERVE_HAPROXY_METRICS_PORT": "23456"})  # the user's
    monkeypatch.setattr(local, "_EXPORTED", {})
    local.export_serve_environment()
    first = local.os.environ["RAY_SERVE_HAPROXY_STATS_PORT"]
    local.export_serve_environment()  # the next stack in this process
    assert local.os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] != first
    assert local.os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"] == "23456"
    local.os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] = "8404"  # set by the user after a stack: kept
    local.export_serve_environment()
    assert local.os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "8404"
