#!/usr/bin/env bash
# Q4Shampoo under DDP on several GPUs of one host, through the launcher and the stock Trainer.
#
#   bash docs/multi_gpu_check.sh OUT_DIR [NPROC]      # NPROC defaults to the number of visible GPUs
#
# Runs tests/fixtures/train_tiny_clm.py (a GPT-2 built from a config, width 256, so its matrices get
# preconditioners) with --optim q4shampoo and bf16:
#   ddp      NPROC ranks x 8 sequences, 40 steps
#   single   one GPU x 8*NPROC sequences, 40 steps (the same global batch)
#   ddp_a    NPROC ranks, 40 steps, checkpoint at step 20
#   ddp_b    NPROC ranks, resumed from ddp_a's checkpoint-20 to step 40
# and prints: every rank's parameter checksum (DDP keeps replicas equal), the losses of ddp and single
# (same global batch: close, not bitwise, because the gradient all-reduce sums in another order), and
# whether the resumed run ends where the uninterrupted ones did (ddp vs ddp_a shows how deterministic two
# identical uninterrupted runs are on this machine). EXTRA_ARGS is appended to every run's flags
# (e.g. EXTRA_ARGS="--use_cpu true --bf16 false" with NPROC=2 runs it on CPU processes).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash docs/multi_gpu_check.sh OUT_DIR [NPROC]}"
nproc="${2:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=4
script=tests/fixtures/train_tiny_clm.py
common=(--optim q4shampoo --optim_args "update_freq=2,root_freq=4" --n_embd 256 --num_examples 4096
        --max_steps 40 --logging_steps 5 --bf16 true --report_to none --disable_tqdm true --seed 0 ${EXTRA_ARGS:-})
run_ddp() { torchrun --standalone --nproc_per_node "$nproc" -m hf_q4shampoo.launcher "$script" "$@" > "$out/$name.log" 2>&1; }
mkdir -p "$out"
status=0
name=ddp;    run_ddp --output_dir "$out/ddp" "${common[@]}" --per_device_train_batch_size 8 --save_strategy no || status=1
name=single; CUDA_VISIBLE_DEVICES=0 python -m hf_q4shampoo.launcher "$script" --output_dir "$out/single" "${common[@]}" \
               --per_device_train_batch_size $((8 * nproc)) --save_strategy no > "$out/single.log" 2>&1 || status=1
name=ddp_a;  run_ddp --output_dir "$out/ddp_a" "${common[@]}" --per_device_train_batch_size 8 --save_strategy steps --save_steps 20 || status=1
name=ddp_b;  run_ddp --output_dir "$out/ddp_b" "${common[@]}" --per_device_train_batch_size 8 --save_strategy no \
               --resume_from_checkpoint "$out/ddp_a/checkpoint-20" || status=1
[ $status -ne 0 ] && tail -n 30 "$out"/*.log
python - "$out" "$nproc" <<'PY'
import json, sys
from pathlib import Path
out, n = Path(sys.argv[1]), int(sys.argv[2])
def ranks(run):
    return [json.loads((out / run / (f"result-rank{r}.json" if n > 1 else "result.json")).read_text()) for r in range(n)]
ddp, saved, resumed = ranks("ddp"), ranks("ddp_a"), ranks("ddp_b")
single = json.loads((out / "single" / "result.json").read_text())
print("ranks:", n, "optimizer:", ddp[0]["optimizer"], "world_size:", ddp[0]["world_size"])
print("ddp checksums per rank:", [r["param_checksum"] for r in ddp], "equal:", len({r["param_checksum"] for r in ddp}) == 1)
print("ddp losses:", [round(x, 4) for x in ddp[0]["losses"]])
print("single-GPU losses (same global batch):", [round(x, 4) for x in single["losses"]])
print("checksum ddp / single:", ddp[0]["param_checksum"], single["param_checksum"])
print("uninterrupted runs ddp / ddp_a checksums:", ddp[0]["param_checksum"], saved[0]["param_checksum"],
      "equal:", ddp[0]["param_checksum"] == saved[0]["param_checksum"])
print("resumed ddp_b checksums per rank:", [r["param_checksum"] for r in resumed],
      "equal to ddp_a:", resumed[0]["param_checksum"] == saved[0]["param_checksum"])
print("losses ddp_a (steps 5-40):", [round(x, 4) for x in saved[0]["losses"]])
print("losses ddp_b (its log history holds the checkpoint's steps 5-20 too):", [round(x, 4) for x in resumed[0]["losses"]])
PY
exit $status
