"""Reranking through the served stack at low load (issue 12): latency, the SubLM that answered, and the
NDCG@10 of those answers on TREC DL 2019 (never trained on).

    .venv/bin/python -m benchmarks.rerank_serving [--depths 20 50] [--data-dir ../shared/data]

The stack of ``cluster/config.local.yaml`` (2 replicas, reranking's own T, latency table measured on this machine)
with its own Redis. One client sends each DL19 query with its BM25 top-``depth`` candidates, one request at
a time (low load: nothing queued ahead), over gRPC ``Rerank`` and over HTTP ``POST /rerank``. Writes
``benchmarks/results/rerank_serving.json`` and the "rerank-serving" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

from benchmarks.report import write_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "rerank_serving.json"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(depths: list[int], data_dir: str, repeats: int) -> dict:
    import grpc
    import httpx
    import yaml
    from tqdm.auto import tqdm

    from benchmarks.stack import StackUnderTest
    from deployments.grpc_api import elasticlm_pb2, elasticlm_pb2_grpc
    from elastic_core.data import load_dl19
    from elastic_core.eval import mean_measure
    from elastic_core.ranker import top

    queries, passages, bm25, qrels = load_dl19(data_dir)
    config = yaml.safe_load((ROOT / "cluster" / "config.local.yaml").read_text())
    (app,) = config["applications"]
    (deployment,) = app["deployments"]
    deployment.pop("autoscaling_config")
    deployment["num_replicas"] = 2
    target_ms = float((app["args"].get("task_target_ms") or {}).get("rerank", app["args"]["target_ms"]))  # rerank's T
    config_path = ROOT / "runs" / "rerank_serving.yaml"
    config_path.parent.mkdir(exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = {"dataset": "trec-dl-2019 passage, BM25 candidates (candidates.tsv)", "queries": len(queries),
           "ranker": app["args"].get("ranker", "dense"),
           "target_ms": target_ms, "replicas": 2, "repeats": repeats, "depths": {}}
    with StackUnderTest(str(config_path), 2) as stack:
        http_url = stack.url.replace("/embed", "/rerank")
        channel = grpc.insecure_channel(stack.grpc_target)
        stub = elasticlm_pb2_grpc.ElasticLMStub(channel)
        client = httpx.Client(timeout=30)
        bar = tqdm(total=len(depths) * 2 * repeats * len(queries), desc="rerank requests", unit="req")
        for depth in depths:
            candidates = top(bm25, depth)
            row = {"bm25_ndcg@10": mean_measure(qrels, candidates, "ndcg_cut.10")}
            for protocol in ("grpc", "http"):
                latencies, sublms, served_run = [], collections.Counter(), {}
                for _ in range(repeats):
                    for q, docs in candidates.items():
                        ids = list(docs)
                        texts = [passages[p] for p in ids]
                        start = time.perf_counter()
                        if protocol == "grpc":
                            response = stub.Rerank(elasticlm_pb2.RerankRequest(query=queries[q], texts=texts),
                                                   metadata=[("application", "elasticlm")], timeout=30)
                            ranks, sublm = [(r.index, r.score) for r in response.ranks], response.sublm
                        else:
                            response = client.post(http_url, json={"query": queries[q], "texts": texts})
                            response.raise_for_status()
                            ranks = [(r["index"], r["score"]) for r in response.json()]
                            sublm = response.headers["x-elasticlm-sublm"]
                        latencies.append((time.perf_counter() - start) * 1000)
                        sublms[sublm] += 1
                        # the answered order, as a run: rank r scores depth - r (ties impossible)
                        served_run[q] = {ids[i]: float(depth - r) for r, (i, _) in enumerate(ranks)}
                        bar.update(1)
                row[protocol] = {
                    "requests": len(latencies), "p50_ms": statistics.median(latencies),
                    "p99_ms": percentile(latencies, 0.99), "within_T": sum(v <= target_ms for v in latencies) / len(latencies),
                    "sublms": dict(sublms), "served_ndcg@10": mean_measure(qrels, served_run, "ndcg_cut.10")}
            out["depths"][str(depth)] = row
        bar.close()
        client.close()
        channel.close()
    return out


def table(result: dict) -> str:
    lines = [f"Low load (one request at a time), the {result.get('ranker', 'cross')} ranker, {result['replicas']} replicas on 2 CPU cores, T = "
             f"{result['target_ms']:g} ms; {result['queries']} DL19 queries x {result['repeats']} each. "
             "Quality: NDCG@10 of the order each answer gave (the SubLM that answered), BM25's beside it.",
             "", "| candidates | protocol | p50 ms | p99 ms | within T | SubLMs that answered | NDCG@10 served | BM25 |",
             "|---|---|---|---|---|---|---|---|"]
    for depth, row in result["depths"].items():
        for protocol in ("grpc", "http"):
            r = row[protocol]
            mix = ", ".join(f"{s} {n / r['requests']:.0%}" for s, n in sorted(r["sublms"].items()))
            lines.append(f"| {depth} | {protocol} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['within_T']:.0%} | "
                         f"{mix} | {r['served_ndcg@10']:.3f} | {row['bm25_ndcg@10']:.3f} |")
    lines += ["", "Command: `.venv/bin/python -m benchmarks.rerank_serving`; results: "
              "`benchmarks/results/rerank_serving.json`."]
    return "\n".join(lines)


def main():
    from elastic_core.data import DEFAULT_DATA_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    a = parser.parse_args()
    result = run(a.depths, a.data_dir, a.repeats)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    write_section("rerank-serving", table(result), title="Reranking through the stack at low load (issue 12): "
                                                         "`benchmarks/rerank_serving.py`")
    print(table(result))


if __name__ == "__main__":
    main()
