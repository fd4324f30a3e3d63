"""Hugging Face's ``InferenceClient`` against elasticlm, as against a text-embeddings-inference endpoint: one
base URL serves ``feature_extraction``, ``sentence_similarity`` and ``text_classification`` (TEI's ``POST /``).

    elasticlm serve &
    .venv/bin/python examples/huggingface_client.py "A man plays a guitar." "Someone performs music." \
        "Stocks fell." [--url http://127.0.0.1:8000]

The API key is ``$ELASTICLM_API_KEY`` when the service requires one.
"""

import argparse
import os

# the hub client refuses every request in offline mode, a local server's included (the Makefile sets it)
os.environ["HF_HUB_OFFLINE"] = "0"

from huggingface_hub import InferenceClient  # noqa: E402

from deployments.wire import api_key_from_environment  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("others", nargs="+")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    a = parser.parse_args()
    client = InferenceClient(base_url=a.url, api_key=api_key_from_environment())
    rows = client.feature_extraction([a.source, *a.others])
    print(f"embeddings: {rows.shape}, norms {rows.dot(rows.T).diagonal().round(3).tolist()}")
    for other, score in zip(a.others, client.sentence_similarity(a.source, a.others)):
        print(f"similarity {score:.3f}  {other[:60]!r}")
    for label in client.text_classification(a.source):
        print(f"{label.label}: {label.score:.3f}")


if __name__ == "__main__":
    main()
