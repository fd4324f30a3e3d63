"""text-embeddings-inference's HTTP API (its ``router/src/http``), for TEI's clients and the Hugging Face
``InferenceClient(base_url=...)``: ``POST /embed``, ``/rerank``, ``/predict``, ``/similarity``, ``/tokenize``,
``/decode``, TEI's root route ``POST /`` (and ``/invocations``); TEI's ``/info`` fields are ``deployments/tei.py``'s;
``/embed_all`` and ``/embed_sparse`` are refused by name.

``POST /`` answers as TEI's root answers for the replica's first task (``tasks`` in its settings; TEI serves
one model, so one task): embed -> ``/embed``, rerank -> ``/rerank``, predict -> ``/predict``. Two bodies no
first-task route can read are answered by what they are, so one base URL serves every Hugging Face client
call: ``inputs`` an object ``{source_sentence, sentences}`` -> ``/similarity`` (TEI's root with
``TASK=sentence-similarity``), and a body with ``parameters`` -> Hugging Face's text-classification task
(what ``InferenceClient.text_classification`` sends: ``top_k``, ``function_to_apply``; answered as the
Hugging Face Inference API answers, ``[[{label, score}, ...]]``). ``feature_extraction`` sends its options
at the top level, never ``parameters``.

TEI's options are served or refused by name (400), never ignored: ``truncation_direction=Left`` (inputs
are cut at their end), ``normalize=false`` (the engine answers L2-normalized rows only), ``prompt_name``
(this model declares no prompts), ``function_to_apply=sigmoid`` (the classifiers are single-label).
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' real parameter types
import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, StrictBool, StrictFloat, ValidationError

from deployments.contract import RequestError, parse_deadline
from deployments.core import ServingCore
from deployments.http.common import JSON, OPTION_HEADERS, REFUSALS, JsonInt, one_of, option_headers, served
from deployments.tasks import EMBED, PREDICT, RERANK
from deployments.tei import NOT_SERVED, decode_ids, no_prompt, normalized, simple_tokens, truncate_at_end
from deployments.wire import MIN_SUBLM_HEADER
from elastic_core.denser import KINDS

TRUNCATION_DIRECTIONS = ("Right", "right", "Left", "left")  # TEI's values and their aliases
DIRECTION = Field("Right", description="where an input over the token limit is cut: Right (its end); Left is refused",
                  json_schema_extra={"enum": list(TRUNCATION_DIRECTIONS)})
PROMPT_NAME = Field(None, description="refused: this model declares no prompts (it is symmetric)")
MIN_SUBLM_FIELD = Field(None, description="quality floor, e.g. 'w50'")


# ----------------------------------------------------------------------------- request and answer models
# The request models document what the one validator (deployments/contract.py) accepts; they do not
# validate beyond JSON types, so HTTP and gRPC refuse the same things with the same messages. Limits that
# depend on the replica's settings are written into the schema by `app.openapi_with_limits`.
class TEIEmbedRequest(BaseModel):
    inputs: str | list[str] = Field(..., description="one text or a list of texts")
    truncate: StrictBool = Field(True, description="truncate texts over the model's token limit (false: reject with 413)")
    truncation_direction: str = DIRECTION
    normalize: StrictBool = Field(True, description="embeddings are always L2-normalized; false is rejected",
                            json_schema_extra={"enum": [True]})
    prompt_name: str | None = PROMPT_NAME
    dimensions: JsonInt | None = Field(None, description="a size the model declares (GET /info: tasks.embed.dimensions)")
    min_sublm: str | None = MIN_SUBLM_FIELD
    kind: str | None = Field(None, description="'query' or 'passage'", json_schema_extra={"enum": [*KINDS, None]})


class TEIRerankRequest(BaseModel):
    query: str = Field(..., description="the text every candidate is judged against")
    texts: list[str] = Field(..., description="the candidates (e.g. a first stage's top 20-100)")
    truncate: StrictBool = Field(True, description="cut a pair over the ranker's token limit: the text's tail, the query "
                                             "kept whole up to half the limit (false: reject with 413)")
    truncation_direction: str = DIRECTION
    raw_scores: StrictBool = Field(False, description="the ranker's raw relevance (a cross-encoder's logit, the dense "
                                                "ranker's cosine) instead of a 0..1 score")
    return_text: StrictBool = Field(False, description="echo each candidate's text in its rank")
    min_sublm: str | None = MIN_SUBLM_FIELD
    first_stage_scores: list[StrictFloat] | None = Field(
        None, description="hybrid reranking: the first stage's score of each text (e.g. BM25), in the texts' order; "
                          "the answer is the ranker's order fused with the first stage's (reciprocal-rank fusion)")


class TEIPredictRequest(BaseModel):
    inputs: str | list[str] | list[list[str]] = Field(
        ..., description="one text, a pair [first, second], or a batch [[text], ...] / [[first, second], ...]; "
                         "pairs only for a pair classifier (GET /info: tasks.predict.pairs)")
    truncate: StrictBool = Field(True, description="truncate inputs over the classifier's token limit (false: reject with 413)")
    truncation_direction: str = DIRECTION
    raw_scores: StrictBool = Field(False, description="logits instead of softmax probabilities")
    min_sublm: str | None = MIN_SUBLM_FIELD


class SimilarityInputs(BaseModel):
    source_sentence: str = Field(..., description="the text the others are compared with")
    sentences: list[str] = Field(..., description="the texts compared with source_sentence")


class SimilarityParameters(BaseModel):
    truncate: StrictBool = True
    truncation_direction: str = DIRECTION
    prompt_name: str | None = PROMPT_NAME


class TEISimilarityRequest(BaseModel):
    inputs: SimilarityInputs
    parameters: SimilarityParameters | None = None


class TEITokenizeRequest(BaseModel):
    inputs: str | list[str] = Field(..., description="one text or a list of texts")
    add_special_tokens: StrictBool = Field(True, description="the special tokens the model reads ([CLS], [SEP])")
    prompt_name: str | None = PROMPT_NAME


class TEIDecodeRequest(BaseModel):
    ids: list[JsonInt] | list[list[JsonInt]] = Field(..., description="one sequence of token ids or a list of them")
    skip_special_tokens: StrictBool = True


class ClassificationParameters(BaseModel):
    top_k: JsonInt | None = Field(None, description="only the k best labels")
    function_to_apply: str | None = Field(None, description="softmax (default) or none (logits); sigmoid is refused",
                                          json_schema_extra={"enum": ["softmax", "none", None]})


class TextClassificationRequest(BaseModel):
    """Hugging Face's text-classification task (``InferenceClient.text_classification``)."""
    inputs: str
    parameters: ClassificationParameters | None = None


class RankBody(BaseModel):
    index: int = Field(..., description="the candidate's position in the request")
    score: float
    text: str | None = Field(None, description="the candidate, with return_text")


class PredictionBody(BaseModel):
    label: str
    score: float


class TokenBody(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None = Field(None, description="the token's first UTF-8 byte in the text (None: a special token)")
    stop: int | None = None


# ----------------------------------------------------------------------------- TEI's options
def truncate_right(truncate: bool, direction: str) -> bool:
    one_of("truncation_direction", direction, TRUNCATION_DIRECTIONS)
    return truncate_at_end(truncate, direction.lower() == "left")


def parsed(model: type[BaseModel], payload):
    """``payload`` as ``model``, refused as FastAPI refuses a body that does not fit (the same 422)."""
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


# ----------------------------------------------------------------------------- the routes
def router(core: ServingCore) -> APIRouter:
    routes = APIRouter()
    validator = core.validator

    async def embed(body: TEIEmbedRequest, http: Request):
        deadline_ms, min_sublm = option_headers(http)
        no_prompt(body.prompt_name)
        normalized(body.normalize)
        answer = await core.serve(EMBED.request(
            validator, body.inputs, truncate_right(body.truncate, body.truncation_direction),
            validator.one_floor(body.min_sublm, min_sublm, MIN_SUBLM_HEADER), body.kind, parse_deadline(deadline_ms),
            dimensions=body.dimensions))
        return served(answer.embeddings, answer)

    async def rerank(body: TEIRerankRequest, http: Request):
        deadline_ms, min_sublm = option_headers(http)
        request = RERANK.request(validator, body.query, body.texts,
                                 truncate_right(body.truncate, body.truncation_direction),
                                 validator.one_floor(body.min_sublm, min_sublm, MIN_SUBLM_HEADER),
                                 parse_deadline(deadline_ms), body.first_stage_scores, body.raw_scores)
        answer = await core.serve(request)
        return served([{"index": i, "score": score, **({"text": request.texts[i]} if body.return_text else {})}
                       for i, score in answer.ranks], answer)

    async def predict(body: TEIPredictRequest, http: Request):
        deadline_ms, min_sublm = option_headers(http)
        request, batch = PREDICT.request(
            validator, body.inputs, truncate_right(body.truncate, body.truncation_direction),
            validator.one_floor(body.min_sublm, min_sublm, MIN_SUBLM_HEADER), parse_deadline(deadline_ms),
            body.raw_scores)
        answer = await core.serve(request)
        rows = [[{"label": label, "score": score} for label, score in row] for row in answer.predictions]
        return served(rows if batch else rows[0], answer)

    async def similarity(body: TEISimilarityRequest, http: Request):
        deadline_ms, min_sublm = option_headers(http)
        options = body.parameters or SimilarityParameters()
        no_prompt(options.prompt_name)
        source = validator.texts(body.inputs.source_sentence, "inputs.source_sentence", one=True)
        others = validator.texts(body.inputs.sentences, "inputs.sentences")
        answer = await core.serve(EMBED.request(
            validator, source + others, truncate_right(options.truncate, options.truncation_direction), min_sublm,
            deadline_ms=parse_deadline(deadline_ms)))
        rows = np.asarray(answer.embeddings, dtype=np.float64)  # L2-normalized: a dot product is the cosine
        return served((rows[1:] @ rows[0]).tolist(), answer)

    async def text_classification(body: TextClassificationRequest, http: Request):
        deadline_ms, min_sublm = option_headers(http)
        options = body.parameters or ClassificationParameters()
        if options.function_to_apply == "sigmoid":
            raise RequestError(400, "function_to_apply='sigmoid' is not supported: the classifier is single-label, "
                                    "its scores a softmax over the labels; send 'softmax' or 'none' (logits)")
        one_of("function_to_apply", options.function_to_apply, ("softmax", "none", None))
        if options.top_k is not None and options.top_k < 1:
            raise RequestError(400, f"top_k must be at least 1, got {options.top_k}")
        request, _ = PREDICT.request(validator, body.inputs, True, min_sublm, parse_deadline(deadline_ms),
                                     raw_scores=options.function_to_apply == "none")
        answer = await core.serve(request)
        return served([[{"label": label, "score": score} for label, score in row[:options.top_k]]
                       for row in answer.predictions], answer)

    first_task_route = {EMBED.name: (TEIEmbedRequest, embed), RERANK.name: (TEIRerankRequest, rerank),
                        PREDICT.name: (TEIPredictRequest, predict)}[next(iter(core.models))]

    async def root(http: Request):
        try:
            payload = orjson.loads(await http.body())
        except orjson.JSONDecodeError:
            raise RequestError(400, "the request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise RequestError(422, "the request body must be a JSON object")
        model, handler = first_task_route
        if isinstance(payload.get("inputs"), dict):
            model, handler = TEISimilarityRequest, similarity
        elif "parameters" in payload:
            model, handler = TextClassificationRequest, text_classification
        return await handler(parsed(model, payload), http)

    task_route = dict(responses=REFUSALS, openapi_extra=OPTION_HEADERS)
    routes.post("/embed", summary="TEI-compatible embeddings", response_model=list[list[float]], **task_route)(embed)
    routes.post("/rerank", summary="TEI-compatible reranking: the candidates best first",
                response_model=list[RankBody], **task_route)(rerank)
    routes.post("/predict", summary="TEI-compatible classification: every label's score, best first",
                response_model=list[PredictionBody] | list[list[PredictionBody]], **task_route)(predict)
    routes.post("/similarity", summary="TEI-compatible sentence similarity: the cosine of source_sentence with each "
                                       "sentence", response_model=list[float], **task_route)(similarity)
    for path in ("/", "/invocations"):  # TEI's root route and its SageMaker alias (not in the schema: see above)
        routes.post(path, include_in_schema=False)(root)

    @routes.post("/tokenize", summary="TEI-compatible tokenization: each text's tokens, neither cut nor padded",
                 response_model=list[list[TokenBody]], responses=REFUSALS)
    async def tokenize(body: TEITokenizeRequest):
        no_prompt(body.prompt_name)
        return JSON([simple_tokens(validator, text, body.add_special_tokens) for text in validator.texts(body.inputs)])

    @routes.post("/decode", summary="TEI-compatible decoding: the text of each sequence of token ids",
                 response_model=list[str], responses=REFUSALS)
    async def decode(body: TEIDecodeRequest):
        batch = bool(body.ids) and isinstance(body.ids[0], list)
        return JSON(decode_ids(validator, body.ids if batch else [body.ids], body.skip_special_tokens))

    @routes.post("/embed_all", include_in_schema=False)
    async def embed_all():
        raise RequestError(404, f"/embed_all is not served: {NOT_SERVED['per_token']}; use /embed", "NotFound")

    @routes.post("/embed_sparse", include_in_schema=False)
    async def embed_sparse():
        raise RequestError(404, f"/embed_sparse is not served: {NOT_SERVED['sparse']}; use /embed", "NotFound")

    return routes
