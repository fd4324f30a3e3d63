"""Serving graphs (``elastic_core/graphs.py``): each SubLM's packed forward (or embedding) traced once computes what
the eager one computes, at any batch shape, int8 and bf16 variants included; padded calls, training and importance
scoring stay eager; weights changed after tracing send the model back to eager; a replica traces what it serves."""

import pytest
import torch

from elastic_core.graphs import trace_sublms
from tests.test_precision import tiny_batch, tiny_model

pytestmark = pytest.mark.fast


def eager_and_traced(names, pooled=False):
    eager, traced = tiny_model(), tiny_model()
    trace_sublms(traced, names, pooled)
    return eager, traced


def shapes():
    ids, mask = tiny_batch()
    yield ids, mask, None                                    # ragged
    yield ids[:1, :7], torch.ones_like(ids[:1, :7]), None   # one text, no padding
    types = torch.zeros_like(ids)
    types[:, 4:] = 1                                         # sentence pairs (a ranker, a pair classifier)
    yield ids[:3], mask[:3], types[:3]


def close(got, want):
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("name", ["w100", "w100-int8", "w100-bf16", "w50-int8", "w25"])
def test_a_graph_computes_what_the_eager_forward_does_at_every_shape(name, pooled):
    eager, traced = eager_and_traced([name], pooled)
    assert set(traced.graphs) == {name}
    with torch.inference_mode():
        for ids, mask, types in shapes():
            for packed in (True, False):
                close(traced(ids, mask, types, name, packed=packed), eager(ids, mask, types, name, packed=packed))
                close(traced.embed(ids, mask, types, name, packed=packed),
                      eager.embed(ids, mask, types, name, packed=packed))


@pytest.mark.parametrize("pooled", [False, True])
def test_packed_inference_runs_the_graph_and_nothing_else_does(pooled):
    _, traced = eager_and_traced(["w50"], pooled)
    calls = []
    traced.graphs["w50"].module = lambda *args: calls.append(args) or torch.zeros(1)
    ids, mask = tiny_batch()
    with torch.inference_mode():
        traced.embed(ids, mask, sublm="w50", packed=True)   # the graph (states graph + pooling, or the embedding's)
        traced(ids, mask, sublm="w50", packed=False)        # padded: eager
        traced.embed(ids, mask, sublm="w25", packed=True)   # not traced: eager
    assert len(calls) == 1
    with torch.inference_mode():
        traced(ids, mask, sublm="w50", packed=True)         # the token states: only a states graph gives them
    assert len(calls) == 1 + (not pooled)


def test_weights_changed_after_tracing_send_the_model_back_to_eager():
    eager, traced = eager_and_traced(["w100", "w100-int8"])
    with torch.no_grad():
        for model in (eager, traced):
            model.layers[0].ffn_in.weight.mul_(1.5)  # what a training step or a merged adapter does
    ids, mask = tiny_batch()
    with torch.inference_mode():
        for name in ("w100", "w100-int8"):
            close(traced(ids, mask, sublm=name, packed=True), eager(ids, mask, sublm=name, packed=True))
    assert traced.graphs == {}


def test_training_and_importance_masks_never_run_a_graph():
    eager, traced = eager_and_traced(["w100"])
    ids, mask = tiny_batch()
    assert traced(ids, mask, sublm="w100", packed=True).requires_grad  # grad enabled: eager, differentiable
    heads = torch.full((ids.shape[0], 2, 4), 0.5)
    with torch.no_grad():
        close(traced(ids, mask, sublm="w100", head_mask=heads), eager(ids, mask, sublm="w100", head_mask=heads))
        states = []
        traced(ids, mask, sublm="w100", packed=True, layer_states=states)
        assert len(states) == 1  # the eager forward filled them


def test_a_replica_traces_the_sublms_it_serves_as_its_tasks_use_them(checkpoint_dir):
    from deployments.core import ServingCore, backbone_of

    base = {"checkpoint": str(checkpoint_dir), "sublms": ["w100", "w25"], "device": "cpu", "profile_cache": None}
    core = ServingCore.build({**base, "tasks": ["embed", "predict"]})
    embedder, classifier = (backbone_of(core.models[task]) for task in ("embed", "predict"))
    assert set(embedder.graphs) == set(classifier.graphs) == {"w100", "w25"}
    assert embedder.graphs["w25"].pooled and not classifier.graphs["w25"].pooled
    core = ServingCore.build({**base, "tasks": ["embed"], "graphs": False})
    assert backbone_of(core.models["embed"]).graphs == {}
