#!/usr/bin/env bash
# Two "nodes" on one machine: two accelerate launchers (machine rank 0 and 1) on the loopback address, CPU and
# gloo, so multi-node launching is exercised without a cluster.
#   bash launch/local_multinode.sh stages.train --config tiny data.train=demo/shards output_dir=runs/mn
#   NPROC_PER_NODE=2 bash launch/local_multinode.sh path/to/script.py ...
# (accelerate 1.15 on a machine without GPUs: `--cpu` would start lone processes; ACCELERATE_USE_CPU=1 with
#  --multi_gpu gives a real gloo process group.)
set -euo pipefail
target=${1:?usage: local_multinode.sh MODULE|SCRIPT.py [args...]}
shift
nproc=${NPROC_PER_NODE:-1}
port=${MASTER_PORT:-$((29500 + RANDOM % 2000))}
export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# `accelerate launch` as the module it runs, in the job's Python: the `accelerate` command imports every subcommand
# first (timm and torchvision among them), 5.5 s against 2.5 s per launcher here.
py=${PYTHON:-python3}
if [[ $target == *.py ]]; then run=("$target"); else run=(-m "$target"); fi
pids=()
for rank in 0 1; do
  "$py" -m accelerate.commands.launch --multi_gpu --num_machines 2 --machine_rank "$rank" --num_processes $((2 * nproc)) \
    --main_process_ip 127.0.0.1 --main_process_port "$port" --rdzv_backend static --same_network \
    --mixed_precision no --dynamo_backend no "${run[@]}" "$@" &
  pids+=($!)
done
# A node that fails ends the job: its peer would otherwise wait in a collective forever (each launcher watches only
# its own processes), so the other launcher is stopped (SIGTERM: it stops its processes and exits).
status=0
while ((${#pids[@]})); do
  wait -n -p done_pid "${pids[@]}" && rc=0 || rc=$?
  done_pid=${done_pid:-}  # unset when wait -n found nothing to report
  if [[ -z $done_pid ]]; then  # bash 5.2 at times answers "no such job" for a launcher it has already reaped
    for pid in "${pids[@]}"; do
      if ! kill -0 "$pid" 2>/dev/null; then done_pid=$pid; wait "$pid" 2>/dev/null && rc=0 || rc=$?; break; fi
    done
    [[ -n $done_pid ]] || { sleep 0.1; continue; }  # none has ended yet: ask again
  fi
  if ((rc != 0 && status == 0)); then
    status=$rc
    kill -TERM "${pids[@]}" 2>/dev/null || true
  fi
  left=()
  for pid in "${pids[@]}"; do [[ $pid != "$done_pid" ]] && left+=("$pid"); done
  pids=("${left[@]}")
done
exit "$status"
