#!/usr/bin/env bash
# Issue 15's recipe quality check on the CPU: AdamW (fp32, torch) against Q4AdamW ("4bit" defaults), two seeds,
# each recipe at its offline default, two runs at a time with one thread each.
#   bash benchmarks/q4adamw_recipes_cpu.sh OUT RECIPE...      RECIPE: image_classification | pretrain_clm | ...
# OPTIMS (default "adamw_torch q4adamw") and SEEDS (default "0 1") choose the runs; the peers are
# OPTIMS="adamw_torch_4bit adamw_bnb_8bit" with torchao / bitsandbytes importable (PYTHONPATH is passed on).
# Writes OUT/RECIPE/{optim}_seed{s}/ (the recipe's own output) and OUT/RECIPE.json (eval metrics of every run).
set -u
out=$1; shift
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
for recipe in "$@"; do
  mkdir -p "$out/$recipe"
  runs=()
  for optim in ${OPTIMS:-adamw_torch q4adamw}; do for seed in ${SEEDS:-0 1}; do runs+=("$optim:$seed"); done; done
  for ((i = 0; i < ${#runs[@]}; i += 2)); do
    for run in "${runs[@]:i:2}"; do
      optim=${run%%:*} seed=${run##*:}
      dir="$out/$recipe/${optim}_seed$seed"
      python "recipes/$recipe.py" --optim "$optim" --seed "$seed" --output_dir "$dir" > "$dir.log" 2>&1 &
    done
    wait
  done
  python - "$out" "$recipe" <<'PY'
import json, sys, pathlib
out, recipe = pathlib.Path(sys.argv[1]), sys.argv[2]
runs = {}
for d in sorted(p for p in (out / recipe).iterdir() if p.is_dir()):
    f = d / "all_results.json"
    runs[d.name] = json.loads(f.read_text()) if f.exists() else {"error": "no all_results.json (see the log)"}
(out / f"{recipe}.json").write_text(json.dumps({"recipe": recipe, "runs": runs}, indent=1))
print(recipe, json.dumps(runs, indent=1)[:2000])
PY
done
