"""The official ``openai`` client against elasticlm, unchanged but for its base URL.

    elasticlm serve &
    .venv/bin/python examples/openai_client.py "first text" "second text" [--url http://127.0.0.1:8000]

The API key is ``$ELASTICLM_API_KEY`` when the service requires one (any string otherwise: the client insists
on one). The SubLM that served is in the response's ``x-elasticlm-sublm`` header.
"""

import argparse

from openai import OpenAI

from deployments.wire import SUBLM_HEADER, api_key_from_environment


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="+")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    a = parser.parse_args()
    client = OpenAI(base_url=f"{a.url}/v1", api_key=api_key_from_environment() or "unused")
    raw = client.embeddings.with_raw_response.create(model="elastic-minilm-l6", input=a.texts)
    answer = raw.parse()
    print(f"served by SubLM {raw.headers[SUBLM_HEADER]}, {answer.usage.prompt_tokens} tokens")
    for text, row in zip(a.texts, answer.data):
        print(f"{text[:40]!r}: dim {len(row.embedding)}, first values {[round(v, 4) for v in row.embedding[:4]]}")


if __name__ == "__main__":
    main()
