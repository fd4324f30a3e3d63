"""The load-test options, declared once: ``LoadOptions`` (what one load generator run is asked for) and
its fields' flags, rendered into every parser that takes them (the locustfile's, ``elasticlm loadtest``'s,
``elasticlm chaos``'s) and into the locust command line the runner starts. Standard library only: the
locustfile imports it under gevent."""

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
