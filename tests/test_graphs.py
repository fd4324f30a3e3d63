"""Serving graphs (``elastic_core/graphs.py``): each SubLM's forward traced once computes what the eager forward
computes, at any batch shape, padded or packed, int8 and bf16 variants included; weights changed after tracing
send the model back to eager; training and importance scoring never run a graph; serving traces what it serves."""

import pytest
import torch

from elastic_core.graphs import trace_sublms
from tests.test_precision import tiny_batch, tiny_model

pytestmark = pytest.mark.fast


def eager_and_traced(names):
    eager, traced = tiny_model(), tiny_model()
    trace_sublms(traced, names)
    return eager, traced


def shapes():
    ids, mask = tiny_batch()
    yield ids, mask, None                                    # ragged: the packed graph
    yield ids[:1, :7], torch.ones_like(ids[:1, :7]), None   # one text, no padding: the padded graph
    types = torch.zeros_like(ids)
    types[:, 4:] = 1                                         # sentence pairs (a ranker, a pair classifier)
    yield ids[:3], mask[:3], types[:3]


@pytest.mark.parametrize("name", ["w100", "w100-int8", "w100-bf16", "w50-int8", "w25"])
def test_a_graph_computes_what_the_eager_forward_does_at_every_shape(name):
    eager, traced = eager_and_traced([name])
    assert set(traced.graphs) == {name}
    with torch.inference_mode():
        for ids, mask, types in shapes():
            for packed in (True, False):
                want = eager(ids, mask, types, name, packed=packed)
                got = traced(ids, mask, types, name, packed=packed)
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(traced.embed(ids, mask, types, name, packed=True),
                                       eager.embed(ids, mask, types, name, packed=True), atol=1e-5, rtol=1e-5)


def test_a_graph_is_what_runs_at_inference():
    _, traced = eager_and_traced(["w50"])
    calls = []
    graph = traced.graphs["w50"]
    graph.padded = graph.packed = lambda *args: calls.append(args) or torch.zeros(1)
    ids, mask = tiny_batch()
    with torch.inference_mode():
        traced(ids, mask, sublm="w50", packed=True)
        traced(ids, mask, sublm="w25", packed=True)  # not traced: eager
    assert len(calls) == 1


def test_weights_changed_after_tracing_send_the_model_back_to_eager():
    eager, traced = eager_and_traced(["w100", "w100-int8"])
    with torch.no_grad():
        for model in (eager, traced):
            model.layers[0].ffn_in.weight.mul_(1.5)  # what a training step or a merged adapter does
    ids, mask = tiny_batch()
    with torch.inference_mode():
        for name in ("w100", "w100-int8"):
            torch.testing.assert_close(traced(ids, mask, sublm=name, packed=True),
                                       eager(ids, mask, sublm=name, packed=True), atol=1e-5, rtol=1e-5)
    assert traced.graphs == {}


def test_training_and_importance_masks_never_run_a_graph():
    eager, traced = eager_and_traced(["w100"])
    ids, mask = tiny_batch()
    out = traced(ids, mask, sublm="w100")  # grad enabled: the eager forward, differentiable
    assert out.requires_grad
    heads = torch.ones(ids.shape[0], 2, 4, requires_grad=True)
    with torch.no_grad():
        masked = traced(ids, mask, sublm="w100", head_mask=heads.detach() * 0.5)
        torch.testing.assert_close(masked, eager(ids, mask, sublm="w100", head_mask=heads.detach() * 0.5))
        states = []
        traced(ids, mask, sublm="w100", layer_states=states)
        assert len(states) == 1  # the eager forward filled them


def test_a_replica_traces_the_sublms_it_serves(checkpoint_dir):
    from deployments.core import ServingCore, backbone_of

    core = ServingCore.build({"checkpoint": str(checkpoint_dir), "tasks": ["embed"], "sublms": ["w100", "w25"],
                              "device": "cpu", "profile_cache": None})
    assert set(backbone_of(core.models["embed"]).graphs) == {"w100", "w25"}
    core = ServingCore.build({"checkpoint": str(checkpoint_dir), "tasks": ["embed"], "sublms": ["w100", "w25"],
                              "device": "cpu", "profile_cache": None, "graphs": False})
    assert backbone_of(core.models["embed"]).graphs == {}
