#!/usr/bin/env bash
# Issue 17, item 3: accuracy and optimizer state of SparseMFAC on the recipes, on the CPU. Four optimizers per
# recipe, each at the recipe's offline defaults except the optimizer (and the M-FAC learning rate):
#   adamw_torch    the recipe's lr
#   q4shampoo      the recipe's default optimizer and lr (its default --optim_args)
#   sparse_mfac    --optim sparse_mfac (m = 10, 1% density, damp 5e-5), --learning_rate $MFAC_LR
#   dense_mfac     --optim sparse_mfac --optim_args k_fraction=1 (dense window, no error feedback), same lr
# Runs one at a time, one thread each (the machine's 2 cores are shared); a run whose all_results.json exists
# is skipped, so an interrupted sweep resumes.
#   bash benchmarks/sparse_mfac_recipes_cpu.sh OUT RECIPE...    RECIPE: finetune_classification | image_classification
#   MFAC_LR=5e-3 SEEDS="0 1" OPTIMS="adamw_torch q4shampoo sparse_mfac dense_mfac" bash ... (the defaults)
#   MFAC_M=64 sets the window length m of both M-FAC runs (default: SparseMFAC's 10); with it, MFAC_DAMP=2e-5 their
#   damping (default: SparseMFAC's 5e-5).
#   MFAC_SPARSE_ARGS="k_fraction=0.05" or "variant=lowrank" adds options to the SparseMFAC runs only (the density
#   and low-rank levers).
#   MFAC_LR_image_classification=2e-2 overrides MFAC_LR for one recipe. 5e-3: best of a SparseMFAC grid on the
#   classification recipe; 2e-2 on the image recipe (docs/results.md, "SparseMFAC on the recipes").
# Writes OUT/RECIPE/{optim}_seed{s}/ (the recipe's own output, memory_report.json included), OUT/RECIPE/*.log and
# OUT/RECIPE.json (eval metrics and measured optimizer state bytes per parameter of every run).
set -u
out=$1; shift
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
seeds=${SEEDS:-0 1}
optims=${OPTIMS:-adamw_torch q4shampoo sparse_mfac dense_mfac}
for recipe in "$@"; do
  mkdir -p "$out/$recipe"
  lr_var="MFAC_LR_$recipe"
  mfac_lr=${!lr_var:-${MFAC_LR:-5e-3}}
  for seed in $seeds; do
    for optim in $optims; do
      dir="$out/$recipe/${optim}_seed$seed"
      [ -f "$dir/all_results.json" ] && continue
      case $optim in
        sparse_mfac) sargs=${MFAC_M:+m=$MFAC_M${MFAC_DAMP:+,damp=$MFAC_DAMP}}
                     [ -n "${MFAC_SPARSE_ARGS:-}" ] && sargs=${sargs:+$sargs,}$MFAC_SPARSE_ARGS
                     extra=(--optim sparse_mfac ${sargs:+--optim_args "$sargs"} --learning_rate "$mfac_lr") ;;
        dense_mfac) extra=(--optim sparse_mfac --optim_args "k_fraction=1${MFAC_M:+,m=$MFAC_M}${MFAC_DAMP:+,damp=$MFAC_DAMP}"
                           --learning_rate "$mfac_lr") ;;
        *) extra=(--optim "$optim") ;;
      esac
      echo "$(date -u +%H:%M:%S) $recipe $optim seed $seed"
      python "recipes/$recipe.py" "${extra[@]}" --seed "$seed" --output_dir "$dir" > "$dir.log" 2>&1 \
        || echo "  failed (see $dir.log)"
    done
  done
  python - "$out" "$recipe" "$mfac_lr" <<'PY'
import json, sys, pathlib
out, recipe, mfac_lr = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
keep = ("eval_accuracy", "eval_f1", "eval_loss", "train_loss", "train_wall_seconds", "optim", "optim_args",
        "optim_state_bytes_per_param", "peak_rss_mib")
runs = {}
for d in sorted(p for p in (out / recipe).iterdir() if p.is_dir()):
    f = d / "all_results.json"
    if not f.exists():
        runs[d.name] = {"error": "no all_results.json (see the log)"}
        continue
    r = {k: v for k, v in json.loads(f.read_text()).items() if k in keep}
    m = d / "memory_report.json"
    if m.exists():
        measured = json.loads(m.read_text())["measured"]
        r["optim_state_bytes"] = measured["total_bytes"]
        r["optim_state_bytes_per_param"] = round(measured["bytes_per_param"], 3)
        r["optim_state_by_kind"] = measured["by_kind"]
    runs[d.name] = r
(out / f"{recipe}.json").write_text(json.dumps({"recipe": recipe, "mfac_lr": float(mfac_lr), "runs": runs}, indent=1))
for name, r in runs.items():
    print(f"{recipe:24s} {name:22s} acc {r.get('eval_accuracy', float('nan')):.4f}  loss {r.get('eval_loss', float('nan')):.4f}"
          f"  state B/param {r.get('optim_state_bytes_per_param', float('nan'))}")
PY
done
