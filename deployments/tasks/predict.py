"""Classification: ``ElasticClassifier`` (``<checkpoint>/tasks/<classifier>``), every label's score per
example (TEI ``/predict``). A pair classifier (e.g. MRPC) reads ``[first, second]``; its pairs are cut
longest first, as ``elastic_core/classify.py`` trains and evaluates them (``truncation=True``)."""

from __future__ import annotations

import numpy as np

from deployments.contract import RequestError, TaskRequest
from deployments.tasks.base import ServedTask, adapter_dir


class Predict(ServedTask):
    name = "predict"
    http_routes = ("/predict",)

    def load(self, cfg, device, loaded: dict):
        from elastic_core.classify import ElasticClassifier

        task_dir = adapter_dir(cfg, self.name, cfg.classifier, "glue --task " + cfg.classifier)
        return ElasticClassifier.from_task_dir(task_dir, device)

    def request(self, v, inputs, truncate: bool | None = True, min_sublm: str | None = None,
                deadline_ms: float | None = None, raw_scores: bool = False) -> tuple[TaskRequest, bool]:
        """TEI's forms: a text, a pair ``[a, b]``, or a batch ``[[a], [b]]`` / ``[[a, b], ...]``.
        Returns the request and whether it was a batch (the answer's shape follows the question's)."""
        batch = isinstance(inputs, (list, tuple)) and bool(inputs) and all(isinstance(x, (list, tuple)) for x in inputs)
        examples = list(inputs) if batch else [inputs]
        if len(examples) > v.limits.max_inputs:
            raise RequestError(413, f"{len(examples)} inputs in one request, more than the limit of "
                                    f"{v.limits.max_inputs}: split the request")
        width = 2 if self.takes_pairs(v.models.get(self.name)) else 1
        firsts, seconds = [], []
        for i, example in enumerate(examples):
            name = f"inputs[{i}]" if batch else "inputs"
            parts = [example] if isinstance(example, str) else example
            if not isinstance(parts, (list, tuple)) or len(parts) != width:
                shape = "a pair of texts [first, second]" if width == 2 else "one text"
                raise RequestError(422, f"{name} must be {shape}: this classifier takes "
                                        f"{'text pairs' if width == 2 else 'single texts'}")
            parts = v.texts(list(parts), name)
            firsts.append(parts[0])
            if width == 2:
                seconds.append(parts[1])
        request = TaskRequest(self.name, firsts, pairs=seconds if width == 2 else None,
                              truncate=v.truncate_flag(truncate), raw_scores=bool(raw_scores),
                              **v.options(min_sublm, deadline_ms))
        return request, batch

    @staticmethod
    def takes_pairs(model) -> bool:
        """Whether the classifier reads text pairs (single texts where the replica does not serve it)."""
        return bool(model is not None and model.takes_pairs)

    def answer(self, request, outputs, model) -> dict:
        return {"predictions": predictions(outputs, model.labels, request.raw_scores)}

    def info(self, model, cfg) -> dict:
        return {"classifier": cfg.classifier, "labels": model.labels, "pairs": model.takes_pairs}

    def openapi_limits(self, schemas: dict, info: dict, text: dict, texts: dict) -> None:
        width = 2 if info["tasks"][self.name]["pairs"] else 1
        example = {"type": "array", "items": text, "minItems": width, "maxItems": width}
        batch = {"type": "array", "items": example, "minItems": 1, "maxItems": info["max_inputs"]}
        schemas["TEIPredictRequest"]["properties"]["inputs"]["anyOf"] = [example, batch] + ([text] if width == 1 else [])


def predictions(logits, labels: list[str], raw_scores: bool = False) -> list[list[tuple[str, float]]]:
    """Per example, every (label, score), best first: softmax probabilities, or logits if ``raw_scores``."""
    rows = np.asarray(logits, dtype=np.float64)
    if not raw_scores:
        rows = np.exp(rows - rows.max(axis=1, keepdims=True))
        rows /= rows.sum(axis=1, keepdims=True)
    return [[(labels[j], float(row[j])) for j in np.argsort(-row, kind="stable")] for row in rows]
