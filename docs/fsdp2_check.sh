#!/usr/bin/env bash
# Q4Shampoo under FSDP2 (fully_shard, DTensor parameters) on 2 GPUs through the launcher and the stock Trainer,
# with a checkpoint at step 20 (FULL_STATE_DICT) and a resume from it.
#
#   OUT=some/folder bash docs/fsdp2_check.sh
#
# Run a: 40 steps, checkpoint at step 20. Run b: resumed from a's checkpoint-20 to step 40. Prints each rank's
# full-parameter checksum and the logged losses of both runs: b must end where a did. Work files go to /tmp/fsdp.
# Q4Shampoo preconditions each rank's local shard (rows split across ranks: a block-diagonal approximation
# that depends on the world size), so the losses differ slightly from the DDP run of docs/multi_gpu_check.sh.
cd "$(dirname "$0")/.." && mkdir -p "${OUT:?set OUT}"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
W=/tmp/fsdp; mkdir -p $W
echo '{"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"], "state_dict_type": "FULL_STATE_DICT"}' > $W/fsdp.json
common=(--optim q4shampoo --optim_args update_freq=2,root_freq=4 --n_embd 256 --num_examples 4096 --logging_steps 5 --bf16 true --report_to none --disable_tqdm true --seed 0 --per_device_train_batch_size 8 --fsdp full_shard --fsdp_config $W/fsdp.json)
torchrun --standalone --nproc_per_node 2 -m hf_q4shampoo.launcher tests/fixtures/train_tiny_clm.py --output_dir $W/a "${common[@]}" --max_steps 40 --save_strategy steps --save_steps 20 > $OUT/a.log 2>&1; echo a rc=$?
ls -la $W/a/checkpoint-20 $W/a/checkpoint-20/* | head -30
torchrun --standalone --nproc_per_node 2 -m hf_q4shampoo.launcher tests/fixtures/train_tiny_clm.py --output_dir $W/b "${common[@]}" --max_steps 40 --save_strategy no --resume_from_checkpoint $W/a/checkpoint-20 > $OUT/b.log 2>&1; echo b rc=$?
for r in a b; do for f in $W/$r/result-rank*.json; do echo $f; python -c "import json;r=json.load(open('$f'));print(r['optimizer'],r['world_size'],r['param_checksum'],[round(x,4) for x in r['losses']])"; done; done
grep -i "error\|warn" $OUT/a.log | sort | uniq -c | head -20
