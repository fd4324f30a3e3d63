"""The official ``cohere`` client (v2 API) against elasticlm, unchanged but for its base URL: embed a query
and the documents, then rerank the documents for the query.

    elasticlm serve &
    .venv/bin/python examples/cohere_client.py "what weakens bones?" "Vitamin D deficiency weakens bones." \
        "Rates rose." [--url http://127.0.0.1:8000]

The API key is ``$ELASTICLM_API_KEY`` when the service requires one (any string otherwise).
"""

import argparse

import cohere
import numpy as np

from deployments.wire import api_key_from_environment


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query")
    parser.add_argument("documents", nargs="+")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    a = parser.parse_args()
    co = cohere.ClientV2(api_key=api_key_from_environment() or "unused", base_url=a.url)
    query = co.embed(model="elastic-minilm-l6", texts=[a.query], input_type="search_query", embedding_types=["float"])
    docs = co.embed(model="elastic-minilm-l6", texts=a.documents, input_type="search_document",
                    embedding_types=["float", "ubinary"])
    cosines = np.array(docs.embeddings.float_) @ np.array(query.embeddings.float_[0])
    print(f"{len(docs.embeddings.ubinary[0])} bytes a document as ubinary; cosines {np.round(cosines, 3).tolist()}")
    ranked = co.rerank(model="elastic-minilm-l6", query=a.query, documents=a.documents, top_n=3)
    for result in ranked.results:
        print(f"{result.relevance_score:.3f}  {a.documents[result.index][:60]!r}")


if __name__ == "__main__":
    main()
