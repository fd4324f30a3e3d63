"""The validation both ingresses share (pure logic with the real tokenizer)."""

import pytest

from deployments.contract import Limits, RequestError, Validator

SUBLMS = ["w100", "w75", "w50", "w25"]


@pytest.fixture(scope="module")
def validator(tokenizer):
    return Validator(tokenizer, max_tokens=16, sublms=SUBLMS, limits=Limits(max_inputs=3, max_input_chars=500))


def test_a_single_string_becomes_one_input(validator):
    request = validator.embed_request("hello world")
    assert request.texts == ["hello world"] and request.kind == "passage" and request.min_sublm is None
    assert validator.tokenize(request.texts) == [[101, 7592, 2088, 102]]  # [CLS] hello world [SEP]


def test_the_rust_tokenizer_matches_the_transformers_one(validator, tokenizer):
    texts = ["Ünïcödé  text\twith tabs", "A moving, beautifully acted film!", "token " * 40]
    assert validator.tokenize(texts) == tokenizer(texts, truncation=True, max_length=16)["input_ids"]


def test_truncation_by_default_and_rejection_on_request(validator):
    long = "token " * 40
    assert len(validator.tokenize([long])[0]) == 16
    with pytest.raises(RequestError) as e:
        validator.tokenize(["fine", long], truncate=False)
    assert e.value.status == 413 and e.value.grpc_code == "INVALID_ARGUMENT" and "inputs[1] has 42 tokens" in e.value.message


@pytest.mark.parametrize("inputs,status,needle", [
    ([], 422, "empty"), (["a", ""], 422, "inputs[1] is empty"), (["a", None], 422, "inputs[1] must be a string"),
    (5, 422, "got int"), (["a"] * 4, 413, "limit of 3"), (["x" * 501], 413, "501 characters"),
])
def test_bad_inputs(validator, inputs, status, needle):
    with pytest.raises(RequestError) as e:
        validator.embed_request(inputs)
    assert e.value.status == status and needle in e.value.message


def test_options_are_checked(validator):
    assert validator.embed_request(["a"], min_sublm="w50", kind="query", deadline_ms=20).min_sublm == "w50"
    for kwargs, needle in [({"min_sublm": "w10"}, "min_sublm"), ({"kind": "doc"}, "kind"),
                           ({"deadline_ms": 0}, "deadline"), ({"deadline_ms": -5}, "deadline"),
                           ({"deadline_ms": float("nan")}, "deadline"), ({"deadline_ms": float("inf")}, "deadline")]:
        with pytest.raises(RequestError, match=needle):
            validator.embed_request(["a"], **kwargs)


def test_token_estimate_needs_no_tokenizer_and_is_capped(validator):
    assert validator.estimate_tokens(["a" * 40]) == 12
    assert validator.estimate_tokens(["a" * 400, "b"]) == 16 + 2


def test_status_to_grpc_code():
    assert RequestError(503, "x").grpc_code == "RESOURCE_EXHAUSTED"
    assert RequestError(422, "x").grpc_code == "INVALID_ARGUMENT"


def test_request_error_survives_pickling():
    """It may cross a process boundary (a deployment-handle call)."""
    import pickle

    e = pickle.loads(pickle.dumps(RequestError(503, "overloaded", "Overloaded")))
    assert (e.status, e.message, e.error_type, e.grpc_code) == (503, "overloaded", "Overloaded", "RESOURCE_EXHAUSTED")
