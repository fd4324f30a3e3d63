"""A search backend's two stages against elasticlm: BM25 (bm25s) retrieves, gRPC ``Rerank`` reorders, top 10.

    elasticlm serve &                                   # the stack, gRPC on 127.0.0.1:9000
    .venv/bin/python examples/search_backend.py "vitamin D and bone density" [--candidates 50] [--deadline-ms 150]

The corpus is SciFact's (``--data-dir``, default ``../shared/data``). The reranking call carries a deadline
twice: as the gRPC time-out (the client gives up after it) and as ``x-elasticlm-deadline-ms`` metadata,
which the service's schedule plans with (Serve's gRPC proxy does not pass the call's deadline on). Under
load the answer comes from a smaller SubLM, named in the response, rather than late; if the service
refuses (RESOURCE_EXHAUSTED) or the deadline passes, the backend serves BM25's order instead of nothing.
The request also carries BM25's scores (``first_stage_scores``): the service fuses its ranking with
BM25's (hybrid reranking; ``--no-hybrid``: the ranker's order alone). With ``$ELASTICLM_API_KEY`` set, the
calls carry the key.
"""

from __future__ import annotations

import argparse
import time

import bm25s
import grpc

from deployments.grpc_api import elasticlm_pb2, elasticlm_pb2_grpc
from deployments.wire import DEADLINE_HEADER, api_key_header
from elastic_core.data import DEFAULT_DATA_DIR, load_scifact


class SearchBackend:
    def __init__(self, corpus: dict[str, str], target: str = "127.0.0.1:9000", app: str = "elasticlm"):
        self.doc_ids, self.texts = list(corpus), list(corpus.values())
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25s.tokenize(self.texts, stopwords="en", show_progress=False), show_progress=False)
        self.channel = grpc.insecure_channel(target)
        self.stub = elasticlm_pb2_grpc.ElasticLMStub(self.channel)
        self.app = app
        self.credentials = [*api_key_header().items()]  # $ELASTICLM_API_KEY, when set

    def first_stage(self, query: str, k: int) -> tuple[list[int], list[float]]:
        """BM25's top ``k``: document indices and their scores, best first."""
        docs, scores = self.bm25.retrieve(bm25s.tokenize([query], stopwords="en", show_progress=False), k=k,
                                          show_progress=False)
        return [int(d) for d in docs[0]], [float(x) for x in scores[0]]

    def search(self, query: str, candidates: int = 50, top: int = 10, deadline_ms: float = 150.0,
               hybrid: bool = True) -> dict:
        """The top ``top`` documents: reranked when the service answers within the deadline, BM25's otherwise."""
        first, scores = self.first_stage(query, candidates)
        request = elasticlm_pb2.RerankRequest(query=query, texts=[self.texts[i] for i in first],
                                              first_stage_scores=scores if hybrid else None)
        metadata = [("application", self.app), (DEADLINE_HEADER, f"{deadline_ms:g}"), *self.credentials]
        start = time.perf_counter()
        try:
            response = self.stub.Rerank(request, metadata=metadata, timeout=deadline_ms / 1000)
        except grpc.RpcError as e:  # overloaded, too late or down: the first stage's order still answers
            return {"ranked_by": f"bm25 (rerank: {e.code().name})", "ms": (time.perf_counter() - start) * 1000,
                    "hits": [(self.doc_ids[i], None) for i in first[:top]]}
        return {"ranked_by": f"elasticlm {response.sublm}{' + bm25' if hybrid else ''}", "ms": (time.perf_counter() - start) * 1000,
                "hits": [(self.doc_ids[first[r.index]], r.score) for r in response.ranks[:top]]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--target", default="127.0.0.1:9000", help="the gRPC address")
    parser.add_argument("--app", default="elasticlm")
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--deadline-ms", type=float, default=150.0)
    parser.add_argument("--no-hybrid", dest="hybrid", action="store_false",
                        help="rank by the service's ranker alone, not fused with BM25's scores")
    a = parser.parse_args()
    corpus = load_scifact(a.data_dir, "test").corpus
    backend = SearchBackend(corpus, a.target, a.app)
    result = backend.search(a.query, a.candidates, deadline_ms=a.deadline_ms, hybrid=a.hybrid)
    print(f"top 10 of {a.candidates} BM25 candidates, ranked by {result['ranked_by']} in {result['ms']:.0f} ms")
    for rank, (doc_id, score) in enumerate(result["hits"], 1):
        text = corpus[doc_id].replace("\n", " ")
        print(f"{rank:2d}. {doc_id:>10} {'' if score is None else f'{score:.3f}':>6}  {text[:90]}")


if __name__ == "__main__":
    main()
