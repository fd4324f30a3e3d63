"""text-embeddings-inference's semantics, once, for both of its wire formats: the HTTP routes
(``deployments/http/tei.py``) and the ``tei.v1`` gRPC services (``deployments/tei_grpc_adapter.py``) each only
map these to their own messages.

Here: a text's tokens (``simple_tokens``), the text of token ids (``decode_ids``), TEI's info fields
(``info_fields``: the model, its type and dtype, the limits, the package's version) and the refusals of the
options TEI has and this core does not serve (left truncation, ``normalize=false``, ``prompt_name``,
sparse and per-token embeddings), each with one message whatever the protocol.
"""

from __future__ import annotations

import functools
import itertools
from importlib import metadata as package_metadata

from deployments.contract import RequestError, Validator, echo
from deployments.core import ServingCore
from deployments.tasks import PREDICT, RERANK

# why TEI's routes / RPCs for sparse and per-token embeddings are not served
NOT_SERVED = {"sparse": "this model has no sparse (SPLADE) head",
              "per_token": "the serving engine answers one pooled embedding per text, not one per token "
                           "(its batches end in the pooling)"}


# ----------------------------------------------------------------------------- TEI's options
def truncate_at_end(truncate: bool, left: bool, left_name: str = "Left", right_name: str = "Right") -> bool:
    """``truncate`` as sent; left truncation (``left``, named as the wire names it) is refused where it
    would apply, rather than silently cutting the other end."""
    if truncate and left:
        raise RequestError(400, f"truncation_direction={left_name} is not supported: inputs over the token limit "
                                f"are cut at their end; send {right_name}, or truncate=false to have them refused")
    return truncate


def no_prompt(prompt_name: str | None):
    if prompt_name is not None:
        raise RequestError(400, f"prompt_name {echo(prompt_name)} is not supported: this model declares no prompts "
                                "(it is symmetric; 'kind' names a query or a passage); leave prompt_name unset")


def normalized(normalize: bool):
    if not normalize:
        raise RequestError(400, "normalize=false is not supported: embeddings are L2-normalized")


# ----------------------------------------------------------------------------- Tokenize and Decode
def whole_tokenizer(validator: Validator):
    """The model's tokenizer, whole: TEI's tokenizing and decoding neither cut nor pad."""
    return next(iter(validator.tokenizers.values())).whole


def simple_tokens(validator: Validator, text: str, add_special_tokens: bool) -> list[dict]:
    """TEI's tokens of ``text``: a special token by its name, any other by its text and UTF-8 byte span
    (TEI's offsets are Rust's, in bytes; Python's tokenizers count characters)."""
    encoding = whole_tokenizer(validator).encode(text, add_special_tokens=add_special_tokens)
    byte_at = list(itertools.accumulate((len(c.encode()) for c in text), initial=0))
    return [{"id": i, "text": token, "special": True, "start": None, "stop": None} if special else
            {"id": i, "text": text[start:stop], "special": False, "start": byte_at[start], "stop": byte_at[stop]}
            for i, token, (start, stop), special in zip(encoding.ids, encoding.tokens, encoding.offsets,
                                                        encoding.special_tokens_mask)]


def decode_ids(validator: Validator, sequences: list[list[int]], skip_special_tokens: bool) -> list[str]:
    """The text of each sequence of token ids; none empty, at most ``max_inputs`` of them, every id the
    vocabulary's."""
    if not sequences or not all(sequences):
        raise RequestError(422, "ids is empty: send at least one token id")
    if len(sequences) > validator.limits.max_inputs:
        raise RequestError(413, f"{len(sequences)} sequences of ids in one request, more than the limit of "
                                f"{validator.limits.max_inputs}: split the request")
    whole = whole_tokenizer(validator)
    vocabulary = whole.get_vocab_size()
    unknown = next((i for sequence in sequences for i in sequence if not 0 <= i < vocabulary), None)
    if unknown is not None:
        raise RequestError(422, f"{unknown} is not a token id (the vocabulary has {vocabulary})")
    return [whole.decode(list(ids), skip_special_tokens=skip_special_tokens) for ids in sequences]


# ----------------------------------------------------------------------------- Info
def model_type(core: ServingCore, task: str) -> dict:
    """TEI's ``model_type`` of the replica's first task (its one key: TEI's gRPC ``ModelType``)."""
    if task == PREDICT.name:
        labels = core.models[task].labels
        return {"classifier": {"id2label": {str(i): label for i, label in enumerate(labels)},
                               "label2id": {label: i for i, label in enumerate(labels)}}}
    if task == RERANK.name:
        return {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    return {"embedding": {"pooling": "mean"}}  # ElasticEncoder: the mean over real tokens, then L2 (model.py)


def model_dtype(core: ServingCore) -> str:
    model = next(iter(core.models.values()))
    parameters = getattr(getattr(model, "model", model), "parameters", None)
    return str(next(parameters()).dtype).removeprefix("torch.") if parameters else "float32"


@functools.cache
def package_version() -> str:
    try:
        return package_metadata.version("elasticlm")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def info_fields(core: ServingCore, info: dict) -> dict:
    """TEI's info fields from ``info`` (``core.describe()``): the model type is the first served task's, the
    batch limits are the engine's; ``max_concurrent_requests`` is 0: admission is by time (can the request
    still meet its target?), not by a count."""
    return {"model_id": info["model"], "model_sha": None, "model_dtype": model_dtype(core),
            "served_model_name": info["model"], "model_type": model_type(core, next(iter(info["tasks"]))),
            "max_concurrent_requests": 0, "max_input_length": info["max_input_tokens"],
            "max_batch_tokens": info["max_batch_tokens"], "max_batch_requests": info["max_batch_texts"],
            "max_client_batch_size": info["max_inputs"], "auto_truncate": True,
            "tokenization_workers": 1,  # tokenizing runs on the replica's event loop
            "version": package_version(), "sha": None, "docker_label": None}
