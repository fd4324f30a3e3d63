"""``elasticlm loadtest``, ``elasticlm chaos`` and ``elasticlm autoscale``, registered with the CLI of
``elastic_core`` through the ``elasticlm.commands`` entry points (pyproject.toml): the core's CLI never imports
the load tests."""

from __future__ import annotations


def register_loadtest(sub) -> None:
    from loadtests.runner import add_arguments

    p = sub.add_parser("loadtest", help="Locust online simulation: elastic vs static vs infinity-emb under one shape")
    add_arguments(p)
    p.set_defaults(func=_loadtest)


def register_chaos(sub) -> None:
    from loadtests.faults import add_arguments

    p = sub.add_parser("chaos", help="faults under a steady load (Redis killed, a replica killed): nothing accepted lost?")
    add_arguments(p)
    p.set_defaults(func=_chaos)


def register_autoscale(sub) -> None:
    from loadtests.autoscale import add_arguments

    p = sub.add_parser("autoscale", help="a sustained surge from one replica on a multi-node Ray cluster: the elastic "
                                         "policy beside Serve's queue-length policy")
    add_arguments(p)
    p.set_defaults(func=_autoscale)


def _loadtest(args) -> int:
    # Locust runs in its own process (it must never share one with Ray); see loadtests/runner.py
    from loadtests.runner import main

    return main(args)


def _chaos(args) -> int:
    from loadtests.faults import main

    return main(args)


def _autoscale(args) -> int:
    from loadtests.autoscale import main

    return main(args)
