"""Open-loop load for elasticlm (or a peer server) over HTTP and gRPC, with a per-request record.

    .venv/bin/locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 \\
        --shape spike --capacity-rps 20 --duration-s 120 --protocol mixed \\
        --record-file runs/loadtest/spike.jsonl

Offered load: ``loadtests/shapes.py`` (rate curves in units of ``--capacity-rps``) and
``loadtests/pacing.py`` (how they become the exact offered rate). ``PacedLoadShape`` only keeps a fixed
pool of users alive; users take tickets from a shared schedule, so the requests *started* per second follow
the curve whatever the latency.

Users: ``HttpEmbedUser`` (TEI ``POST /embed``, or with ``--peer-openai`` an OpenAI-style
``POST /embeddings`` of a peer such as infinity-emb) and ``GrpcEmbedUser``
(``elasticlm.v1.ElasticLM/Embed``); with ``--task rerank`` they send a TREC DL 2019 query and its BM25
top ``--candidates`` to TEI ``POST /rerank`` and ``Rerank`` instead. Choose with ``--protocol http|grpc|mixed``
or by naming the classes on the command line; ``mixed`` splits one schedule between them (``--grpc-share``).

``--connection-retries N`` (default 0): a request whose connection was refused, reset or closed unanswered is
resent at most N times, over HTTP to the next of ``--http-endpoints`` (``deployments/endpoints.py``), over gRPC
by gRPC's retry policy on UNAVAILABLE across the addresses of ``--grpc-target`` (``ipv4:HOST:PORT,HOST:PORT``).

Shedding: HTTP 503/429 and gRPC RESOURCE_EXHAUSTED are the server's designed answer to overload
(bounded queues), not errors. Locust counts them as *successes* under their own name
(``/embed [shed]``, ``grpc Embed [shed]``), so its failure count and exit code mean "broken", and its
latency table keeps the fast shed answers apart from served ones; the record file has ``status: shed``.

Record file (``--record-file``): its fields are listed in ``loadtests/records.py``.

Run one Locust process (no ``--processes``/workers: the schedule lives in the process), headless.

Import order matters: locust first (gevent monkey-patching must precede ssl/grpc imports), gRPC's
gevent integration before any channel, and never ray (its imports break under gevent's patching).
"""

# locust first: importing it monkey-patches the standard library for gevent, which must happen before
# ssl, urllib3 or grpc are imported (afterwards it fails with RecursionError)
from locust import LoadTestShape, User, constant, events, task  # noqa: I001
from locust.contrib.fasthttp import FastHttpUser
from locust.runners import MasterRunner, WorkerRunner

import gevent
import grpc
import grpc.experimental.gevent
from geventhttpclient.response import HTTPConnectionClosed
from geventhttpclient.useragent import EmptyResponse

# Without this, every blocking gRPC call holds the whole process: users would run one at a time.
grpc.experimental.gevent.init_gevent()

import datetime  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain file by locust, from any directory
    sys.path.insert(0, str(REPO))

from deployments.endpoints import GRPC_MAX_ATTEMPTS, Failover, endpoints, grpc_channel_options  # noqa: E402
from deployments.grpc_api import elasticlm_pb2, elasticlm_pb2_grpc  # noqa: E402
from deployments.wire import (DEADLINE_HEADER, MIN_SUBLM_HEADER, RETRY_AFTER_HEADER, SUBLM_HEADER,  # noqa: E402
                              api_key_header)
from loadtests.options import add_locust_arguments, shape_kwargs  # noqa: E402
from loadtests.pacing import ArrivalSchedule, Pacer, SplitSchedule, users_needed  # noqa: E402
from loadtests.records import Outcome, Plan, Recorder, Stream  # noqa: E402
from loadtests.shapes import make_shape  # noqa: E402
from loadtests.texts import request_sampler  # noqa: E402

logger = logging.getLogger("elasticlm.loadtest")

SHED_HTTP = (429, 503)
CREDENTIALS = api_key_header()  # $ELASTICLM_API_KEY, when set: sent to elasticlm, never to a peer server
PROTOCOLS = ("http", "grpc")


# --------------------------------------------------------------------------- options

@events.init_command_line_parser.add_listener
def _add_arguments(parser):
    add_locust_arguments(parser)
    g = parser.add_argument_group("connection failures")
    g.add_argument("--http-endpoints", default="",
                   help="comma-separated base URLs of every proxy (default: --host); with --connection-retries "
                        "a request whose connection failed goes to the next")
    g.add_argument("--connection-retries", type=int, default=0,
                   help=f"resend a request whose connection was refused, reset or closed without an answer at most "
                        f"this many times (0..{GRPC_MAX_ATTEMPTS - 1}; gRPC: its retry policy on UNAVAILABLE)")


def _connection_failed(exc) -> bool:
    """The connection was refused, reset or closed without an answer: safe to resend (every route is
    idempotent). Not a time-out: the request may still be running, and a resend adds to an overload."""
    exc = getattr(exc, "original", None) or exc  # geventhttpclient wraps some in RetriesExceeded
    return isinstance(exc, (ConnectionError, HTTPConnectionClosed, EmptyResponse))


# --------------------------------------------------------------------------- the run

PLAN: Plan | None = None
_user_serial = 0


def _fail(message: str):
    logger.error(message)
    raise SystemExit(f"locustfile: {message}")


def _protocols(environment) -> list[str]:
    options = environment.parsed_options
    named = list(getattr(options, "user_classes", None) or [])
    by_name = {HttpEmbedUser.__name__: "http", GrpcEmbedUser.__name__: "grpc"}
    if options.protocol:
        wanted = list(PROTOCOLS) if options.protocol == "mixed" else [options.protocol]
        if named and sorted(by_name.get(n, n) for n in named) != sorted(wanted):
            _fail(f"--protocol {options.protocol} contradicts the user classes named on the command line: {named}")
        return wanted
    return [by_name[n] for n in named if n in by_name] or ["http"]


@events.init.add_listener
def _plan(environment, **_):
    global PLAN
    options = environment.parsed_options
    if options is None:  # library use without the command line: nothing to plan
        return
    if isinstance(environment.runner, (MasterRunner, WorkerRunner)) or getattr(options, "processes", None):
        _fail("run in a single process: the schedule is per process (no --master/--worker/--processes)")
    try:
        protocols = _protocols(environment)
        if options.peer_openai and "grpc" in protocols:
            raise ValueError("--peer-openai is HTTP only: use --protocol http")
        if not 0.0 < options.grpc_share < 1.0 and len(protocols) == 2:
            raise ValueError(f"--grpc-share must be in (0, 1) with --protocol mixed, got {options.grpc_share}")
        if not 0 <= options.connection_retries < GRPC_MAX_ATTEMPTS:
            raise ValueError(f"--connection-retries must be 0..{GRPC_MAX_ATTEMPTS - 1}: {options.connection_retries}")
        kw = shape_kwargs(options.shape_kw)
        if options.shape == "replay":
            kw.setdefault("trace", options.trace or None)
        duration = options.duration_s if options.duration_s > 0 or options.shape != "replay" else None
        shape = make_shape(options.shape, options.capacity_rps, duration, **kw)
        if options.peer_openai and options.task != "embed":
            raise ValueError("--peer-openai serves embeddings only: use --task embed")
        texts = request_sampler(options.task, options.data_dir, options.passages, options.query_share,
                                options.texts_per_request, options.candidates, options.seed)
    except (ValueError, OSError) as e:
        _fail(str(e))
    shares = {"http": 1.0 - options.grpc_share, "grpc": options.grpc_share} if len(protocols) == 2 else \
        {protocols[0]: 1.0}
    streams, capped = {}, False
    for protocol, share in shares.items():
        want = users_needed(shape.peak_rps() * share, options.latency_headroom_s, max_users=sys.maxsize)
        cap = max(1, round(options.max_users * share))
        capped |= want > cap
        streams[protocol] = Stream(protocol, share, min(want, cap))
    classes = {"http": HttpEmbedUser, "grpc": GrpcEmbedUser}
    for protocol, cls in classes.items():
        cls.fixed_count = streams[protocol].users if protocol in streams else 0
    HttpEmbedUser.network_timeout = HttpEmbedUser.connection_timeout = options.request_timeout_s
    PLAN = Plan(options, shape, streams, [classes[p] for p in streams], texts, options.peer_openai, capped)
    if capped:
        logger.warning("--max-users %d caps the pool below peak rate x --latency-headroom-s: slow responses "
                       "will delay requests (see lag_ms in the record file)", options.max_users)
    logger.info("shape %s over %.1f s, peak %.2f rps; users %s", shape.name, shape.duration_s, shape.peak_rps(),
                {p: s.users for p, s in streams.items()})


@events.test_start.add_listener
def _start(environment, **_):
    if PLAN is None:
        return
    o = PLAN.options
    schedule = ArrivalSchedule(PLAN.shape, poisson=o.arrivals == "poisson", seed=o.seed)
    split = SplitSchedule(schedule, {p: s.share for p, s in PLAN.streams.items()})
    PLAN.clock_start, PLAN.start_epoch = time.monotonic(), time.time()
    for protocol, stream in PLAN.streams.items():
        stream.pacer = Pacer(split.streams[protocol])
        stream.started = stream.recorded = stream.in_flight_at_stop = stream.late_100ms = 0
        stream.max_lag_ms = 0.0
        stream.pacer.start(PLAN.clock_start)
    if "grpc" in PLAN.streams and not PLAN.grpc_stubs:
        # round_robin over every address of the target; retries on UNAVAILABLE when asked for
        options = grpc_channel_options(1 + o.connection_retries, o.grpc_target)
        PLAN.grpc_channels = [grpc.insecure_channel(o.grpc_target, options=options)
                              for _ in range(max(1, o.grpc_channels))]
        PLAN.grpc_stubs = [elasticlm_pb2_grpc.ElasticLMStub(c) for c in PLAN.grpc_channels]
    path = Path(o.record_file or f"runs/loadtest/records-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}.jsonl")
    PLAN.recorder = Recorder(path)
    PLAN.recorder.write({
        "type": "run", "version": 1,
        "started_at": PLAN.start_epoch,
        "shape": PLAN.shape.describe(), "capacity_rps": o.capacity_rps, "shape_kw": o.shape_kw,
        "arrivals": o.arrivals, "streams": {p: {"share": s.share, "users": s.users} for p, s in PLAN.streams.items()},
        "users_capped": PLAN.capped, "max_users": o.max_users, "latency_headroom_s": o.latency_headroom_s,
        "host": environment.host or HttpEmbedUser.host, "grpc_target": o.grpc_target if "grpc" in PLAN.streams else None,
        "api": "openai" if PLAN.peer else "tei", "peer_model": o.peer_model if PLAN.peer else None,
        "task": o.task, "candidates": o.candidates if o.task == "rerank" else None,
        "texts_per_request": o.texts_per_request, "query_share": o.query_share, "passages": o.passages,
        "data_dir": str(o.data_dir), "seed": o.seed, "deadline_ms": o.deadline_ms, "min_sublm": o.min_sublm or None,
        "request_timeout_s": o.request_timeout_s,
    })
    logger.info("recording every request to %s", path)


@events.test_stopping.add_listener
def _stopping(environment, **_):
    # before Locust kills the users: afterwards nothing is in flight any more
    if PLAN is not None and PLAN.started:
        for stream in PLAN.streams.values():
            stream.in_flight_at_stop = stream.pacer.in_flight


@events.test_stop.add_listener
def _stop(environment, **_):
    if PLAN is None or PLAN.recorder is None:
        return
    recorder, PLAN.recorder = PLAN.recorder, None
    streams = {}
    for p, s in PLAN.streams.items():
        streams[p] = {"expected": round(s.pacer.schedule.expected_count(0.0, PLAN.shape.duration_s), 3),
                      "started": s.started, "recorded": s.recorded, "in_flight_at_stop": s.in_flight_at_stop,
                      "late_over_100ms": s.late_100ms, "max_lag_ms": round(s.max_lag_ms, 3)}
    recorder.write({"type": "summary", "ended_at": time.time(), "elapsed_s": round(PLAN.elapsed(), 3),
                    "streams": streams})
    recorder.close()
    late = sum(s["late_over_100ms"] for s in streams.values())
    if late:
        logger.warning("%d requests started over 100 ms after their due time: the offered load fell behind "
                       "the shape (raise --max-users or --latency-headroom-s, or the generator lacks CPU)", late)
    logger.info("%d requests recorded in %s", recorder.count, recorder.path)


@events.quit.add_listener
def _quit(**_):
    if PLAN is not None:
        for channel in PLAN.grpc_channels:
            channel.close()


# --------------------------------------------------------------------------- users

class _PacedUser:
    """Takes the next ticket of its protocol's schedule, waits until it is due, sends it, records it."""

    protocol = ""
    wait_time = constant(0)  # pacing happens in the task, from the shared schedule

    def paced_request(self):
        stream = PLAN.streams[self.protocol]
        pacer = stream.pacer
        ticket = pacer.claim()
        if ticket is None:  # schedule over: idle until the shape stops the run
            gevent.sleep(1.0)
            return
        wait = pacer.wait_s(ticket)
        if wait > 0:
            gevent.sleep(wait)
        kind, texts = PLAN.texts.sample(self.protocol, ticket.seq)
        lag_ms = (pacer.elapsed() - ticket.due_s) * 1000.0
        stream.started += 1
        stream.max_lag_ms = max(stream.max_lag_ms, lag_ms)
        stream.late_100ms += lag_ms > 100.0
        pacer.in_flight += 1
        try:
            outcome, attempts, retry_ms = self.send_until_answered(kind, texts)
        finally:  # a user killed at stop leaves no record, only the in-flight count of the summary
            pacer.in_flight -= 1
        if PLAN.recorder is None:  # the run is being stopped
            return
        stream.recorded += 1
        PLAN.recorder.write({
            "type": "request", "protocol": self.protocol, "api": self.api, "seq": ticket.seq,
            "due_s": round(ticket.due_s, 6), "start_ts": outcome.start_ts, "lag_ms": round(lag_ms, 3),
            "latency_ms": round(outcome.latency_ms, 3), "status": outcome.status, "code": outcome.code,
            "sublm": outcome.sublm, "kind": kind, "n_texts": len(texts), "n_chars": sum(map(len, texts)),
            "prompt_tokens": outcome.prompt_tokens, "bytes": outcome.bytes,
            "offered_rps": round(PLAN.shape.rate_at(ticket.due_s), 6),
            "error": None if outcome.error is None else outcome.error[:300],
            "attempts": attempts, "retry_ms": round(retry_ms, 3),
        })

    def send_until_answered(self, kind: str, texts: list[str]) -> tuple[Outcome, int, float]:
        """(the last attempt's outcome, attempts, ms from the first attempt to the last one's start)."""
        o = PLAN.options
        first = time.time()
        attempts = unconnected = 0
        while True:
            outcome = self.send(kind, texts)
            attempts += 1
            if self.connection_failed:
                unconnected += 1
                pause = self.failover_pause_s(unconnected)
                if pause is not None:
                    gevent.sleep(pause)
                    continue
            if outcome.status != "shed" or o.retry_on_shed == "none":
                break
            pause = outcome.retry_after_s if o.retry_on_shed == "after" else 0.0
            if time.time() + pause - first > o.retry_for_s:
                break  # gave up: the request stays shed
            gevent.sleep(pause)
        return outcome, attempts, (outcome.start_ts - first) * 1000.0

    def send(self, kind: str, texts: list[str]) -> Outcome:
        raise NotImplementedError

    connection_failed = False  # the last send's connection failed (gRPC users: their channel retries itself)

    def failover_pause_s(self, failures: int) -> float | None:
        """The pause before resending a request whose ``failures``-th send failed to connect; None: give up."""
        return None


class HttpEmbedUser(_PacedUser, FastHttpUser):
    """TEI ``POST /embed`` (SubLM from the ``x-elasticlm-sublm`` header), or with ``--peer-openai``
    an OpenAI-style ``POST /embeddings`` whose SubLM is recorded as ``--peer-sublm``."""

    protocol = "http"
    host = "http://127.0.0.1:8000"
    fixed_count = 0

    @task
    def embed(self):
        self.paced_request()

    def on_start(self):
        global _user_serial
        _user_serial += 1
        o = PLAN.options
        # users start spread over the proxies; each keeps to the one that answered it last
        self.failover = Failover(endpoints(o.http_endpoints, self.host), attempts=1 + o.connection_retries,
                                 current=_user_serial)

    def failover_pause_s(self, failures):
        self.failover.failed()
        return self.failover.pause_s(failures) if self.failover.may_retry(failures) else None

    @property
    def api(self) -> str:
        return "openai" if PLAN.peer else "tei"

    def send(self, kind, texts):
        o = PLAN.options
        headers = {} if PLAN.peer else dict(CREDENTIALS)
        if o.deadline_ms:
            headers[DEADLINE_HEADER] = str(o.deadline_ms)
        if PLAN.peer:
            path, body = o.peer_path, {"model": o.peer_model, "input": texts}
        elif kind == "rerank":
            path, body = "/rerank", {"query": texts[0], "texts": texts[1:]}
            if o.min_sublm:
                headers[MIN_SUBLM_HEADER] = o.min_sublm
        else:
            path, body = "/embed", {"inputs": texts, "kind": kind}
            if o.min_sublm:
                headers[MIN_SUBLM_HEADER] = o.min_sublm
        url = self.failover.endpoint + path
        with self.client.post(url, json=body, headers=headers, name=path, catch_response=True) as resp:
            code = resp.status_code or 0
            meta = resp.request_meta
            self.connection_failed = not code and _connection_failed(meta.get("exception"))
            status, sublm, error = "failed", None, None
            retry_after = 1.0
            if code in SHED_HTTP:
                status = "shed"
                meta["name"] = f"{path} [shed]"
                resp.success()
                try:
                    retry_after = float(resp.headers.get("retry-after") or 1.0)
                except ValueError:
                    pass
            elif 200 <= code < 300:
                sublm = (o.peer_sublm or o.peer_model) if PLAN.peer else resp.headers.get(SUBLM_HEADER)
                if sublm:
                    status = "ok"
                    resp.success()
                else:
                    error = f"HTTP {code} without a {SUBLM_HEADER} header"
                    resp.failure(error)
            else:
                exc = meta.get("exception")
                error = f"HTTP {code}: {(resp.text or '')[:200]}" if code else f"no response: {exc!r}"
                resp.failure(error)
            return Outcome(status, code, sublm, meta.get("response_time") or 0.0, meta["start_time"],
                            meta.get("response_length") or 0, None, error, retry_after)


class GrpcEmbedUser(_PacedUser, User):
    """``elasticlm.v1.ElasticLM/Embed`` through the generated stubs; SubLM from the response."""

    protocol = "grpc"
    api = "grpc"
    fixed_count = 0

    @task
    def embed(self):
        self.paced_request()

    def on_start(self):
        global _user_serial
        _user_serial += 1
        self.stub = PLAN.grpc_stubs[_user_serial % len(PLAN.grpc_stubs)]  # channels multiplex: share a few

    def send(self, kind, texts):
        o = PLAN.options
        metadata = [("application", o.grpc_app), *CREDENTIALS.items()]
        if o.deadline_ms:
            metadata.append((DEADLINE_HEADER, str(o.deadline_ms)))
        if kind == "rerank":
            rpc, request = "Rerank", elasticlm_pb2.RerankRequest(query=texts[0], texts=texts[1:], min_sublm=o.min_sublm)
        else:
            rpc, request = "Embed", elasticlm_pb2.EmbedRequest(inputs=texts, kind=kind, min_sublm=o.min_sublm)
        start_ts, t0 = time.time(), time.perf_counter()
        response, error, code, retry_after = None, None, "OK", 1.0
        try:
            response, call = getattr(self.stub, rpc).with_call(request, metadata=metadata, timeout=o.request_timeout_s)
        except grpc.RpcError as e:
            code, error = e.code().name, f"{e.code().name}: {e.details()}"
            try:
                retry_after = float(dict(e.trailing_metadata() or ()).get(RETRY_AFTER_HEADER) or 1.0)
            except ValueError:
                pass
        latency_ms = (time.perf_counter() - t0) * 1000.0
        name, exception, status, sublm, size, tokens = rpc, None, "failed", None, 0, None
        if response is not None:
            sublm = response.sublm or dict(call.trailing_metadata() or ()).get(SUBLM_HEADER)
            size, tokens = response.ByteSize(), getattr(response, "prompt_tokens", None)
            if sublm:
                status = "ok"
            else:
                error = "OK without a SubLM in the response"
        elif code == "RESOURCE_EXHAUSTED":
            status, name, error = "shed", f"{rpc} [shed]", None
        if status == "failed":
            exception = RuntimeError(error)
        events.request.fire(request_type="grpc", name=name, response_time=latency_ms, response_length=size,
                            exception=exception, context={})
        return Outcome(status, code, sublm, latency_ms, start_ts, size, tokens, error, retry_after)


# --------------------------------------------------------------------------- the shape

class PacedLoadShape(LoadTestShape):
    """A fixed pool of paced users for the length of the shape, then a drain, then stop."""

    def tick(self):
        if PLAN is None:
            return None
        t, end = PLAN.elapsed(), PLAN.shape.duration_s
        if PLAN.started and t >= end and (PLAN.in_flight() == 0 or t >= end + PLAN.options.drain_s):
            return None
        users = PLAN.total_users
        # spawn the whole pool within about a second; >100/s only makes Locust warn
        return users, float(min(max(users, 1), 100)), PLAN.user_classes
