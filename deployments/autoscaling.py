"""Autoscaling on the elastic signal, on top of Ray Serve's queue-length policy.

Compute elasticity reacts in milliseconds: under a surge the schedule serves smaller SubLMs at
once. Replicas take seconds to arrive, so quality stays reduced meanwhile. This policy closes the
loop: while a sizeable share of recent traffic runs on a reduced SubLM it asks for one more replica
than the queue-length rule would (sustained degraded quality buys capacity); while any traffic is
still degraded it never scales down; only once replicas serve (almost) everything with the full
SubLM does the queue-length rule alone decide, so replicas can go again. Serve applies
min/max replicas, the scaling factors and the up/down delays on top of what this returns.
"""

from __future__ import annotations

import logging
import math

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

logger = logging.getLogger("ray.serve")


class ElasticAutoscalingPolicy:
    def __init__(self, degraded_upscale: float = 0.2, degraded_hold: float = 0.02):
        if not 0 <= degraded_hold <= degraded_upscale <= 1:
            raise ValueError("need 0 <= degraded_hold <= degraded_upscale <= 1")
        self.degraded_upscale = degraded_upscale
        self.degraded_hold = degraded_hold

    @staticmethod
    def degraded_share(ctx: AutoscalingContext) -> float:
        """Mean over running replicas of the share of texts served by a reduced SubLM."""
        per_replica = (ctx.aggregated_metrics or {}).get("degraded_share") or {}
        return sum(per_replica.values()) / len(per_replica) if per_replica else 0.0

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict]:
        queue_rule, _ = replica_queue_length_autoscaling_policy(ctx)
        share = self.degraded_share(ctx)
        current = ctx.current_num_replicas
        if current == 0:
            desired = queue_rule
        elif share >= self.degraded_upscale:
            desired = max(queue_rule, current + 1)
        elif share > self.degraded_hold:
            desired = max(queue_rule, current)
        else:
            desired = queue_rule
        state = dict(ctx.policy_state or {})
        # a decision is logged once: Serve acts on whole replicas, and the queue rule's fraction moves
        # with every metrics push (a line each time cost the controller and Ray's log pipeline CPU)
        decided = math.ceil(desired)
        if decided != (state.get("elastic") or {}).get("decided", current):
            logger.info("elastic policy: %.0f%% of recent texts on a reduced SubLM, queue rule %.2f -> %d replicas "
                        "(running %d)", 100 * share, queue_rule, decided, current)
        state["elastic"] = {"degraded_share": share, "queue_rule": queue_rule, "desired": desired, "decided": decided}
        return desired, state
