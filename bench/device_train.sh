#!/bin/bash
# Issue 20 on a GPU node (run there from the repository root, OUT set to a results folder): `recserve train
# --workers` streamed from Criteo-format shards with 1 GPU worker (NCCL) and 1, 4 and 8 CPU workers (gloo).
# One JSON line per run in $OUT/runs.jsonl. The node needs Ray 2.60 and recserve's pure-Python dependencies:
# where it has no package index, put their wheels (cp312) in .whl/ first (a Ray wheel without ray/jars, ray/rllib
# and ray/llm fits in 45 MB).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD RAY_ADDRESS= COLUMNS=100 PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
nvidia-smi -L; nproc; python3 -c "import torch, numpy, pyarrow; print(torch.__version__, numpy.__version__, pyarrow.__version__)"
cli() { python3 -c "from recserve.cli import main; main()" "$@"; }
ROWS=${ROWS:-400000}
cli write-shards --rows $ROWS --shard-rows 100000 --out /tmp/sh || exit 1
for args in "--workers 1 --gpu" "--workers 1" "--workers 4" "--workers 8"; do
  name=$(echo $args | tr -d ' -')
  t0=$(date +%s.%N)
  cli train --data criteo:/tmp/sh,min_freq=20 --out /tmp/m-$name --epochs 1 --batch-size 4096 --readers 2 $args \
    > $OUT/log-$name.txt 2>&1
  rc=$?
  t1=$(date +%s.%N)
  grep -E "^epoch|trained|error|Error" $OUT/log-$name.txt | tail -4
  python3 - "$args" "$rc" "$t0" "$t1" /tmp/m-$name <<'PY' >> $OUT/runs.jsonl
import json, sys
args, rc, t0, t1, out = sys.argv[1:]
wall = float(t1) - float(t0)
try:
    m = json.load(open(out + "/model.json"))["metrics"]
    print(json.dumps({"args": args, "rc": int(rc), "wall_s": float(wall), "rows_per_s": m["history"]["rows_per_s"],
                      "auc": m["held_out"]["auc"], "rows": m["history"]["rows"]}))
except Exception as e:
    print(json.dumps({"args": args, "rc": int(rc), "wall_s": float(wall), "error": repr(e)}))
PY
done
cat $OUT/runs.jsonl
