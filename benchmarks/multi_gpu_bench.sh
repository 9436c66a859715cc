#!/usr/bin/env bash
# Q4Shampoo on N GPUs against one GPU (issue 16): DDP with the preconditioner work split, and FSDP2 DCP checkpoints.
#
#   bash benchmarks/multi_gpu_bench.sh OUT_DIR [N]        # N defaults to the number of visible GPUs
#   TINY=1 bash benchmarks/multi_gpu_bench.sh OUT_DIR 2   # a tiny model on CPU processes (gloo): checks the script
#
# Runs benchmarks/multi_gpu_bench.py (GPT-2 small, per-rank batch 8x1024, bf16 autocast, update_freq=10,
# root_freq=100, 300 timed steps after 20; fused AdamW and Q4Shampoo's designs, one after the other: the split
# preconditioners (default), whole matrices per owner (shard_parameters), replicated, and torch's ZeRO over it):
#   ddp_ws{N}            N ranks under DDP
#   ddp_ws1              one GPU at the same per-rank batch (the reference of memory and optimizer time; every
#                        design is the single-process optimizer there, so only fused AdamW and Q4Shampoo run)
#   ddp_ws1_data{N}      one GPU at the same global batch (N x 8 sequences: the loss reference)
#   fsdp2_ckpt_ws{N}     FSDP2, DCP checkpoint at step 20 of 40, resumed in a fresh process state: bitwise? With
#                        deterministic algorithms (--deterministic), and a control pair of uninterrupted runs
# then prints the comparison (OUT_DIR/summary_ws{N}.json). EXTRA_ARGS is appended to every run; FSDP2=0 skips the
# FSDP2 check (when only the DDP designs are compared).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash benchmarks/multi_gpu_bench.sh OUT_DIR [N]}"
n="${2:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
mkdir -p "$out"
extra=(${EXTRA_ARGS:-})
[ -n "${TINY:-}" ] && extra+=(--tiny)
bench=benchmarks/multi_gpu_bench.py
status=0
run() { local name=$1; shift; echo "== $name"; "$@" > "$out/$name.log" 2>&1 || { status=1; tail -n 30 "$out/$name.log"; }; grep -E "^(rank0|fsdp2|wrote)" "$out/$name.log"; }
run "ddp_ws$n"        torchrun --standalone --nproc_per_node "$n" $bench --out "$out" --modes ddp "${extra[@]}"
run ddp_ws1           torchrun --standalone --nproc_per_node 1 $bench --out "$out" --modes ddp \
                        --optimizers adamw,q4shampoo "${extra[@]}"
run "ddp_ws1_data$n"  torchrun --standalone --nproc_per_node 1 $bench --out "$out" --modes ddp --data_world "$n" \
                        --optimizers q4shampoo "${extra[@]}"
[ "${FSDP2:-1}" = 0 ] || run "fsdp2_ckpt_ws$n" torchrun --standalone --nproc_per_node "$n" $bench --out "$out" --modes fsdp2_ckpt \
                        --deterministic "${extra[@]}"
python $bench --out "$out" --summarize "$n" || status=1
exit $status
