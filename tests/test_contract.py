"""The validation both ingresses share (pure logic with the real tokenizer)."""

import pytest

from deployments.contract import Limits, RequestError, Validator

SUBLMS = ["w100", "w75", "w50", "w25"]


@pytest.fixture(scope="module")
def validator(tokenizer):
    return Validator(tokenizer, max_tokens=16, sublms=SUBLMS, limits=Limits(max_inputs=3, max_input_chars=500))


def test_a_single_string_becomes_one_input(validator):
    job = validator.embed_job("hello world")
    assert len(job.input_ids) == 1 and job.kind == "passage" and job.min_sublm is None
    assert job.num_tokens == len(job.input_ids[0]) == 4  # [CLS] hello world [SEP]


def test_truncation_by_default_and_rejection_on_request(validator):
    long = "token " * 40
    assert len(validator.embed_job([long]).input_ids[0]) == 16
    with pytest.raises(RequestError) as e:
        validator.embed_job([long], truncate=False)
    assert e.value.status == 413 and e.value.grpc_code == "INVALID_ARGUMENT" and "inputs[0] has 42 tokens" in e.value.message


@pytest.mark.parametrize("inputs,status,needle", [
    ([], 422, "empty"), (["a", ""], 422, "inputs[1] is empty"), (["a", None], 422, "inputs[1] must be a string"),
    (5, 422, "got int"), (["a"] * 4, 413, "limit of 3"), (["x" * 501], 413, "501 characters"),
])
def test_bad_inputs(validator, inputs, status, needle):
    with pytest.raises(RequestError) as e:
        validator.embed_job(inputs)
    assert e.value.status == status and needle in e.value.message


def test_options_are_checked(validator):
    assert validator.embed_job(["a"], min_sublm="w50", kind="query", deadline_ms=20).min_sublm == "w50"
    for kwargs, needle in [({"min_sublm": "w10"}, "min_sublm"), ({"kind": "doc"}, "kind"),
                           ({"deadline_ms": 0}, "deadline"), ({"deadline_ms": -5}, "deadline")]:
        with pytest.raises(RequestError, match=needle):
            validator.embed_job(["a"], **kwargs)


def test_status_to_grpc_code():
    assert RequestError(503, "x").grpc_code == "RESOURCE_EXHAUSTED"
    assert RequestError(422, "x").grpc_code == "INVALID_ARGUMENT"


def test_request_error_survives_pickling():
    """Replicas raise it (admission) and Ray ships it to the ingress by pickle."""
    import pickle

    e = pickle.loads(pickle.dumps(RequestError(503, "overloaded", "Overloaded")))
    assert (e.status, e.message, e.error_type, e.grpc_code) == (503, "overloaded", "Overloaded", "RESOURCE_EXHAUSTED")
