"""``elasticlm serve``, registered with the CLI of ``elastic_core`` through the ``elasticlm.commands`` entry point
(pyproject.toml): the core's CLI never imports the serving stack. Light on purpose (every ``elasticlm`` call
builds its parser): the stack itself is imported only when the command runs."""

from __future__ import annotations

from elastic_core.paths import REPO_ROOT

DEFAULT_CONFIG = REPO_ROOT / "cluster" / "config.local.yaml"


def register_serve(sub) -> None:
    p = sub.add_parser("serve", help="run Redis + Ray + the Serve app locally, in the foreground")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--redis-url", help="use this Redis instead of starting one (default: $REDIS_URL)")
    p.add_argument("--redis-port", type=int, default=6391, help="port of the Redis started here")
    p.add_argument("--target-ms", type=float, help="override the config's latency target T")
    p.add_argument("--checkpoint", help="override the config's checkpoint directory")
    p.add_argument("--num-cpus", type=int, help="CPUs given to Ray (default: all)")
    p.add_argument("--api-key", help="require 'authorization: Bearer KEY' on every route and RPC but health "
                                     "(default: $ELASTICLM_API_KEY or the file $ELASTICLM_API_KEY_FILE names; "
                                     "prefer those: a command line is visible to every local user)")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    from deployments.local import main

    return main(args)
