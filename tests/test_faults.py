"""The fault runner's figures (``loadtests/faults.py``), on synthetic records: pure logic, no stack."""

from loadtests.faults import analyze, check_targets

T0 = 1000.0


def request(due_s, status="ok", latency_ms=20.0, sublm="w100", code=200):
    return {"start_ts": T0 + due_s, "lag_ms": 0.0, "latency_ms": latency_ms, "status": status, "code": code,
            "sublm": sublm if status == "ok" else None, "n_texts": 1}


def test_lost_is_anything_but_answered_or_shed_and_windows_split_at_the_fault():
    requests = [request(t / 10) for t in range(0, 200)]                          # 0-20 s: fine
    requests += [request(20 + t / 10, latency_ms=400, sublm="w25") for t in range(50)]  # the fault: slow, small
    requests += [request(25.1, "shed", code=503), request(25.2, "failed", code=0), request(25.3, "failed", code=500),
                 {**request(25.4, "failed", code=0), "error": "no response: ConnectionRefusedError(111, 'Connection refused')"}]
    requests += [request(40 + t / 10) for t in range(100)]                        # after
    samples = [(T0 + t / 4, 2, 3) for t in range(0, 80)]                          # 0-20 s: 2 live
    samples += [(T0 + 20 + t / 4, None, None) for t in range(40)]                 # Redis down 20-30 s
    samples += [(T0 + 30 + t / 4, 1, 0) for t in range(8)]                        # 30-32 s: 1 live
    samples += [(T0 + 32 + t / 4, 2, 1) for t in range(80)]                       # back at 32 s
    a = analyze(requests, samples, T0, fault_start=T0 + 20, fault_end=T0 + 30, target_ms=150)
    assert (a["requests"], a["ok"], a["shed"], a["lost"]) == (354, 350, 1, 3)
    assert a["lost_codes"] == {"0": 2, "500": 1}
    assert a["lost_unconnected"] == 1                      # refused at connect: never reached the stack
    assert a["p99_before_ms"] == 20 and a["p99_during_ms"] == 400 and a["p99_after_ms"] == 20
    assert a["within_T_during"] == 0.0
    assert a["live_replicas_before"] == 2 and a["replicas_back_s"] == 2.0
    assert a["share_gone_s"] == 10.0                       # the first reading after the fault with fewer live
    assert a["full_sublm"] == "w100" and a["mix_back_s"] == 10.0   # the first second after 30 s all w100
    assert a["answers_back_s"] == 10.0                     # nothing was due 30-40 s: answered again at 40 s


def test_a_service_that_never_recovers_misses_its_targets():
    requests = [request(t / 10) for t in range(300)]
    samples = [(T0 + t / 4, 2, 0) for t in range(80)] + [(T0 + 20 + t / 4, 1, 0) for t in range(40)]
    a = analyze(requests, samples, T0, fault_start=T0 + 20, fault_end=T0 + 20, target_ms=150)
    assert a["replicas_back_s"] is None and a["share_gone_s"] == 0.0
    targets = {t["name"]: t["met"] for t in check_targets({"replica-kill": {"analysis": a}, "redis-kill": {"analysis": a}})}
    assert targets["replica-kill: 0 lost"] and targets["replica-kill: dead replica's share gone within the TTL"]
    assert not targets["replica-kill: replacement replica live (s after the kill)"]
    assert not targets["redis-kill: global depth back within 5 s"]


def test_a_refusal_costs_what_haproxy_spends_per_request_or_what_a_replica_spends_alone():
    from loadtests.refusals import refusal_cost_under_load

    before = {"counts": {"handled": 100, "haproxy_5xx": 0, "replica_5xx": 0},
              "cpu": {"haproxy 7": 1.0, "ServeReplica 8": 10.0}}
    after = {"counts": {"handled": 10100, "haproxy_5xx": 6000, "replica_5xx": 100},
             "cpu": {"haproxy 7": 2.0, "ServeReplica 8": 40.0}}
    out = refusal_cost_under_load(before, after, replica_ms_per_refusal=1.0)
    assert out["haproxy_cpu_ms_per_request"] == 0.1  # 1 s over 10,000 requests
    assert (out["refused_by_haproxy"], out["refused_by_replicas"]) == (6000, 100)
    assert out["cpu_ms_per_refusal"] == round((6000 * 0.1 + 100 * 1.0) / 6100, 4)
    assert "cpu_ms_per_refusal" not in refusal_cost_under_load(before, before, 1.0)  # nothing refused: no figure


def test_overload_targets_are_the_issues():
    a = {"lost": 0, "accepted_within_T_during": 0.96, "served_rps_during": 180.0}
    run = {"analysis": a, "capacity_rps": 193.0, "refusals_during": {"cpu_ms_per_refusal": 0.12}}
    met = {t["name"]: t["met"] for t in check_targets({"overload-impatient": run})}
    assert met == {"overload-impatient: 0 lost": True,
                   "overload-impatient: >= 95 % of accepted requests answered within T": True,
                   "overload-impatient: a refusal costs the stack <= 0.3 ms of CPU during the overload (ms)": True,
                   "overload-impatient: served throughput >= 0.9 x capacity (x capacity)": True}
    slow = {**run, "analysis": {**a, "accepted_within_T_during": 0.94, "served_rps_during": 170.0}}
    assert sum(t["met"] for t in check_targets({"overload-patient": slow})) == 2
