"""The validation both ingresses share (pure logic with the real tokenizer)."""

import math
from types import SimpleNamespace

import pytest

from deployments.contract import Limits, RequestError, Validator
from deployments.tasks import EMBED, PREDICT, RERANK

pytestmark = pytest.mark.fast  # pure logic: `make test-fast`

SUBLMS = ["w100", "w75", "w50", "w25"]


@pytest.fixture(scope="module")
def validator(tokenizer):
    return Validator(tokenizer, max_tokens=16, sublms=SUBLMS, limits=Limits(max_inputs=3, max_input_chars=500))


def test_a_single_string_becomes_one_input(validator):
    request = EMBED.request(validator, "hello world")
    assert request.texts == ["hello world"] and request.kind == "passage" and request.min_sublm is None
    assert validator.tokenize(request) == ([[101, 7592, 2088, 102]], None)  # [CLS] hello world [SEP]


def test_the_rust_tokenizer_matches_the_transformers_one(validator, tokenizer):
    texts = ["Ünïcödé  text\twith tabs", "A moving, beautifully acted film!", "token " * 40]
    assert validator.tokenize(EMBED.request(validator, texts))[0] == tokenizer(texts, truncation=True,
                                                                              max_length=16)["input_ids"]
    # a rerank pair: query first, the query whole and the passage cut (transformers' only_second, as the
    # ranker is trained and evaluated), token types as transformers gives them
    query, passages = "vitamin d and bones", ["token " * 40, "short passage"]
    expected = tokenizer([query] * 2, passages, truncation="only_second", max_length=16)
    assert validator.tokenize(RERANK.request(validator, query, passages)) == (expected["input_ids"],
                                                                           expected["token_type_ids"])


def test_serving_cuts_a_long_query_passage_pair_as_training_and_evaluation_do(validator, tokenizer):
    """One rule (elastic_core/pairs.py): the query whole while it takes at most half the room, else cut to
    that half; the passage's tail goes first. The ranker's training and evaluation encode through it too."""
    from elastic_core.pairs import QueryPassageEncoder, pair_lengths
    from elastic_core.ranker import DenseRanker

    assert pair_lengths(5, 40, 13) == (5, 8) and pair_lengths(30, 40, 13) == (6, 7)
    assert pair_lengths(30, 2, 13) == (11, 2) and pair_lengths(3, 4, 13) == (3, 4)
    long_query, passage = "query " * 30, "token " * 40
    ids, types = validator.tokenize(RERANK.request(validator, long_query, [passage]))
    assert ids == [[101] + [23032] * 6 + [102] + [19204] * 7 + [102]] and types == [[0] * 8 + [1] * 8]
    ranker = DenseRanker(None, ["w100"], tokenizer, 16)
    from elastic_core.ranker import query_passage_batch

    batch = query_passage_batch(ranker, [long_query], [passage])
    assert (batch["input_ids"], batch["token_type_ids"]) == (ids, types)
    assert QueryPassageEncoder(tokenizer, 16).encode([long_query], [passage]).whole_lengths == [73]


def test_truncation_by_default_and_rejection_on_request(validator):
    long = "token " * 40
    assert len(validator.tokenize(EMBED.request(validator, [long]))[0][0]) == 16
    with pytest.raises(RequestError) as e:
        validator.tokenize(EMBED.request(validator, ["fine", long], truncate=False))
    assert e.value.status == 413 and e.value.grpc_code == "INVALID_ARGUMENT" and "inputs[1] has 42 tokens" in e.value.message


@pytest.mark.parametrize("inputs,status,needle", [
    ([], 422, "empty"), (["a", ""], 422, "inputs[1] is empty"), (["a", None], 422, "inputs[1] must be a string"),
    (5, 422, "got int"), (["a"] * 4, 413, "limit of 3"), (["x" * 501], 413, "501 characters"),
])
def test_bad_inputs(validator, inputs, status, needle):
    with pytest.raises(RequestError) as e:
        EMBED.request(validator, inputs)
    assert e.value.status == status and needle in e.value.message


def test_options_are_checked(validator):
    assert EMBED.request(validator, ["a"], min_sublm="w50", kind="query", deadline_ms=20).min_sublm == "w50"
    for kwargs, needle in [({"min_sublm": "w10"}, "min_sublm"), ({"kind": "doc"}, "kind"),
                           ({"deadline_ms": 0}, "deadline"), ({"deadline_ms": -5}, "deadline"),
                           ({"deadline_ms": float("nan")}, "deadline"), ({"deadline_ms": float("inf")}, "deadline")]:
        with pytest.raises(RequestError, match=needle):
            EMBED.request(validator, ["a"], **kwargs)


def test_token_estimate_needs_no_tokenizer_and_is_capped(validator):
    assert validator.estimate_tokens(EMBED.request(validator, ["a" * 40])) == 12
    assert validator.estimate_tokens(EMBED.request(validator, ["a" * 400, "b"])) == 16 + 2
    assert validator.estimate_tokens(RERANK.request(validator, "q" * 8, ["a" * 20])) == 5 + 2 + 3  # [CLS], 2x [SEP]


def test_status_to_grpc_code():
    assert RequestError(503, "x").grpc_code == "RESOURCE_EXHAUSTED"
    assert RequestError(422, "x").grpc_code == "INVALID_ARGUMENT"


def test_request_error_survives_pickling():
    """It may cross a process boundary (a deployment-handle call)."""
    import pickle

    e = pickle.loads(pickle.dumps(RequestError(503, "overloaded", "Overloaded")))
    assert (e.status, e.message, e.error_type, e.grpc_code) == (503, "overloaded", "Overloaded", "RESOURCE_EXHAUSTED")


@pytest.mark.parametrize("call,status,needle", [
    (lambda v: RERANK.request(v, None, ["a"]), 422, "query is missing"),
    (lambda v: RERANK.request(v, " ", ["a"]), 422, "query is empty"),
    (lambda v: RERANK.request(v, ["q1", "q2"], ["a"]), 422, "query must be one string"),
    (lambda v: RERANK.request(v, "q", "a"), 422, "texts must be a list"),
    (lambda v: RERANK.request(v, "q", []), 422, "texts is empty"),
    (lambda v: RERANK.request(v, "q", ["a"] * 4), 413, "4 texts in one request"),
    (lambda v: RERANK.request(v, "q", ["a", "b"], first_stage_scores=[1.0]), 400,
     "first_stage_scores has 1 scores for 2 texts"),
    (lambda v: RERANK.request(v, "q", ["a"], first_stage_scores=[float("nan")]), 422, "must be finite numbers"),
    (lambda v: RERANK.request(v, "q", ["a"], first_stage_scores=[True]), 422, "must be finite numbers"),
    (lambda v: v.tokenize(RERANK.request(v, "q", ["ok", "token " * 40], truncate=False)), 413,
     "texts[1] with the query has"),
    (lambda v: PREDICT.request(v, ["a", "b"]), 422, "takes single texts"),
    (lambda v: PREDICT.request(v, [["a"], ["b", "c"]]), 422, "inputs[1] must be one text"),
    (lambda v: PREDICT.request(v, [["a"]] * 4), 413, "4 inputs in one request"),
    (lambda v: PREDICT.request(v, [["a"], [""]]), 422, "inputs[1][0] is empty"),
])
def test_task_requests_are_checked(validator, call, status, needle):
    with pytest.raises(RequestError) as e:
        call(validator)
    assert e.value.status == status and needle in e.value.message, e.value.message


def test_predict_answers_in_the_shape_it_was_asked():
    """A text or a pair is one example; a list of lists is a batch."""
    from elastic_core.model import load_tokenizer

    v = Validator(load_tokenizer(), 16, SUBLMS, models={"predict": SimpleNamespace(takes_pairs=True)})
    request, batch = PREDICT.request(v, ["first", "second"])
    assert (request.texts, request.pairs, batch) == (["first"], ["second"], False)
    request, batch = PREDICT.request(v, [["a", "b"], ["c", "d"]])
    assert (request.texts, request.pairs, batch) == (["a", "c"], ["b", "d"], True)
    with pytest.raises(RequestError, match="a pair of texts"):
        PREDICT.request(v, "one text")


def test_ranked_and_predictions_are_best_first():
    from deployments.tasks.predict import predictions
    from deployments.tasks.rerank import ranked

    assert [i for i, _ in ranked([[0.0], [2.0], [-1.0]])] == [1, 0, 2]
    assert ranked([[0.0], [2.0]], top_n=1)[0][1] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert ranked([[0.0], [2.0]], raw_scores=True) == [(1, 2.0), (0, 0.0)]
    cosines = [[0.2], [-0.6], [0.8]]  # a bi-encoder's: its own map to 0..1, and raw as they are
    assert ranked(cosines, unit=lambda c: (c + 1) / 2) == [(2, pytest.approx(0.9)), (0, pytest.approx(0.6)),
                                                          (1, pytest.approx(0.2))]
    assert ranked(cosines, raw_scores=True, unit=lambda c: (c + 1) / 2)[0] == (2, pytest.approx(0.8))
    # hybrid: the ranker's order fused with the first stage's by rank; the scores are the fusion's
    fused = ranked(cosines, unit=lambda c: (c + 1) / 2, first_stage_scores=[9.0, 1.0, 3.0])
    assert [i for i, _ in fused] == [0, 2, 1]  # 0 and 2 tie (first and second, each in one list): input order
    assert fused[0][1] == pytest.approx((61 / 2) * (1 / 62 + 1 / 61)) and fused[-1][1] < fused[0][1] <= 1
    assert ranked(cosines, raw_scores=True, first_stage_scores=[9.0, 1.0, 3.0])[0] == (0, pytest.approx(0.2))
    (row,) = predictions([[0.0, 1.0]], ["neg", "pos"])
    assert [label for label, _ in row] == ["pos", "neg"] and sum(score for _, score in row) == pytest.approx(1.0)


def test_the_openapi_not_blank_pattern_is_the_validators_blank():
    """What the schema calls blank is what the validator refuses as empty, for every character."""
    import re

    from deployments.contract import NOT_BLANK_PATTERN

    pattern = re.compile(NOT_BLANK_PATTERN, re.ASCII)  # schemathesis' reading; explicit code points read alike
    for c in map(chr, range(0x110000)):
        if 0xD800 <= ord(c) <= 0xDFFF:
            continue
        assert bool(pattern.search(c)) == bool(c.strip()), repr(c)


def test_rank_fusion_is_one_for_first_in_both_and_follows_either_list_on_ties():
    from elastic_core.ranker import fuse_with_first_stage

    assert fuse_with_first_stage([0.9, 0.1], [5.0, 1.0]).tolist() == pytest.approx([1.0, 61 / 62])
    crossed = fuse_with_first_stage([0.9, 0.1], [1.0, 5.0])  # each first in one list: equal
    assert crossed[0] == pytest.approx(crossed[1])
