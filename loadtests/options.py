"""The load-test options, declared once: ``LoadOptions`` (what one load generator run is asked for) and
its fields' flags, rendered into every parser that takes them (the locustfile's, ``elasticlm loadtest``'s,
``elasticlm chaos``'s) and into the locust command line the runner starts; beside them, the flags only the
load generator takes (``add_locust_arguments``) and how ``--shape-kw`` reads (``shape_kwargs``). Standard
library only: the locustfile imports it under gevent."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from elastic_core.data import DEFAULT_DATA_DIR
from loadtests.shapes import SHAPES


def option(default, help: str, choices: tuple | None = None, **kw):
    """A field that is also a command-line flag (``--<name-with-dashes>``)."""
    return field(default=default, metadata={"help": help, "choices": choices}, **kw)


@dataclass
class LoadOptions:
    shape: str = option("spike", "offered-load curve", SHAPES)
    duration_s: float = option(120.0, "length of the offered load (replay: the trace is stretched to it; "
                                      "0 keeps its own time)")
    shape_kw: str = option("", "shape multipliers as k=v,k=v, e.g. peak_frac=3,base_frac=0.2 "
                               "(see loadtests.shapes.make_shape)")
    trace: str = option("", "CSV of (seconds, requests_per_second) rows for --shape replay")
    protocol: str | None = option(None, "which users run (default: the user classes named on locust's command "
                                        "line, else http)", ("http", "grpc", "mixed"))
    task: str = option("embed", "embed: texts to /embed or Embed; rerank: a TREC DL 2019 query and its BM25 top "
                                "--candidates to /rerank or Rerank", ("embed", "rerank"))
    candidates: int = option(20, "with --task rerank: passages per request")
    texts_per_request: int = option(1, "texts per embed request")
    query_share: float = option(0.5, "fraction of requests made of short queries (the rest: passages)")
    data_dir: str = option(str(DEFAULT_DATA_DIR), "shared data directory (default ../shared/data; "
                                                  "env ELASTICLM_DATA_DIR)")
    max_users: int = option(400, "cap on the pool of paced users")
    seed: int = option(0, "texts and Poisson arrivals are reproducible per seed")
    extra: list[str] = field(default_factory=list)  # further locust arguments, as they are

    @classmethod
    def flags(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if "help" in f.metadata]

    @classmethod
    def from_args(cls, args) -> "LoadOptions":
        """The options a parser with ``add_load_arguments`` parsed (those it took; the rest keep their default)."""
        return cls(**{f.name: getattr(args, f.name) for f in cls.flags() if hasattr(args, f.name)})

    def locust_args(self) -> list[str]:
        """These options on locust's command line (the locustfile's parser reads them back)."""
        args = []
        for f in self.flags():
            value = getattr(self, f.name)
            if value not in (None, ""):
                args += [flag(f.name), str(value)]
        return args


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_load_arguments(parser, only: tuple[str, ...] | None = None) -> None:
    """Adds the options (``only`` these, when given) to an ``argparse`` parser or group."""
    for f in LoadOptions.flags():
        if only is not None and f.name not in only:
            continue
        kind = {float: float, int: int}.get(type(f.default))
        parser.add_argument(flag(f.name), default=f.default, help=f.metadata["help"],
                            **({"type": kind} if kind else {}),
                            **({"choices": f.metadata["choices"]} if f.metadata["choices"] else {}))


def add_locust_arguments(parser) -> None:
    """The locustfile's whole command line: ``LoadOptions``, and the flags only the load generator takes."""
    g = parser.add_argument_group("elasticlm load shape")
    add_load_arguments(g, only=("shape", "duration_s", "trace", "shape_kw", "max_users"))
    g.add_argument("--capacity-rps", type=float, default=20.0,
                   help="the deployment's measured capacity in requests/s: shapes are multiples of it")
    g.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform",
                   help="uniform: evenly spaced at the current rate (exact); poisson: exponential gaps, same rate")
    g.add_argument("--latency-headroom-s", type=float, default=2.0,
                   help="response time the pool absorbs at the peak rate without falling behind the schedule")
    g.add_argument("--drain-s", type=float, default=10.0,
                   help="after the schedule ends, wait up to this long for requests still in flight")

    g = parser.add_argument_group("elasticlm requests")
    add_load_arguments(g, only=("task", "candidates", "protocol"))
    g.add_argument("--grpc-share", type=float, default=0.5, help="with --protocol mixed: share of requests over gRPC")
    g.add_argument("--grpc-target", default="127.0.0.1:9000", help="host:port of the gRPC proxy")
    g.add_argument("--grpc-app", default="elasticlm", help="Serve application name (gRPC metadata 'application')")
    g.add_argument("--grpc-channels", type=int, default=4, help="gRPC channels shared by the gRPC users")
    g.add_argument("--request-timeout-s", type=float, default=30.0)
    g.add_argument("--retry-on-shed", choices=("none", "after", "at-once"), default="none",
                   help="a shed request is: recorded as shed (none), sent again after the server's Retry-After "
                        "(after), or sent again at once (at-once: an impatient client)")
    g.add_argument("--retry-for-s", type=float, default=10.0,
                   help="with --retry-on-shed: a client gives up (recorded as shed) once this long has passed")
    g.add_argument("--deadline-ms", type=float, default=None, help="send x-elasticlm-deadline-ms with every request")
    g.add_argument("--min-sublm", default="", help="send a quality floor with every request, e.g. w50")
    g.add_argument("--peer-openai", action="store_true",
                   help="HTTP users call an OpenAI-compatible peer (infinity-emb): POST --peer-path")
    g.add_argument("--peer-path", default="/embeddings")
    g.add_argument("--peer-model", default="all-MiniLM-L6-v2", help="'model' sent to the peer")
    g.add_argument("--peer-sublm", default="", help="SubLM recorded for peer responses (default: --peer-model)")

    g = parser.add_argument_group("elasticlm texts and record")
    add_load_arguments(g, only=("data_dir", "query_share", "texts_per_request", "seed"))
    g.add_argument("--passages", choices=("scifact", "dl19", "both"), default="both",
                   help="passage source: SciFact abstracts, TREC DL 2019 passages, or both")
    g.add_argument("--record-file", default="",
                   help="per-request JSON lines (default runs/loadtest/records-<UTC time>.jsonl)")


def shape_kwargs(text: str) -> dict:
    """``--shape-kw`` (``k=v,k=v``) as keyword arguments of ``make_shape``: numbers, ``none``, or strings."""
    kwargs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--shape-kw: expected key=value, got {item!r}")
        key, value = key.strip(), value.strip()
        if value.lower() == "none":
            kwargs[key] = None
            continue
        try:
            kwargs[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            kwargs[key] = value
    return kwargs
