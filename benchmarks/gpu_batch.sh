#!/usr/bin/env bash
# One device-tool call's worth of GPU measurements (docs/perf_notes.md says which call ran which part).
#   bash benchmarks/gpu_batch.sh OUT PART...
#   PART: tests | tests_graph | ttt_tree:DIR:RUN,... | first_step | launches:OLD_TREE | graph | graph_ttt | graph_kept | graph_small | cholesky | host_profile | spread | bench | bench_fused | bench_fused_paper1 | bench:TAG:OPTIM_ARGS | q4adamw | ttt:RUN,RUN,... | ab_host:OLD:OPTIMIZER[:OPTIM_ARGS]
#   TTT_Q4="NAME:LR:ARGS ..." (optional) replaces time_to_target.py's Q4Shampoo runs, TTT_ADAMW its AdamW lr grid,
#   TTT_FIRST_ORDER="NAME:LR ..." adds other first-order runs (time_to_target.py --first_order; named NAME@LR)
# Every part runs in its own processes; a failing part does not stop the others. Logs go to OUT/*.log.
set -u
out=$1; shift
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
fresh_caches() {  # every benchmark process compiles from empty caches, as a user's first run does
  export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d)
}
bench() {  # bench TAG OPTIM_ARGS: fused AdamW and Q4Shampoo on GPT-2 small, one fresh process
  fresh_caches
  python -m hf_q4shampoo.bench --optimizers adamw,q4shampoo --steps 200 --warmup 20 --phases \
    --optim_args "$2" --json "$out/bench_$1.json" > "$out/bench_$1.log" 2>&1
  tail -4 "$out/bench_$1.log"
}
bench_plain() {  # bench_plain TAG OPTIM_ARGS [bench args]: as bench, without stage timers (they force eager steps)
  fresh_caches; local tag=$1 args=$2; shift 2
  python -m hf_q4shampoo.bench --optimizers adamw,q4shampoo --steps 200 --warmup 20 --optim_args "$args" "$@" \
    --json "$out/bench_$tag.json" > "$out/bench_$tag.log" 2>&1
  tail -3 "$out/bench_$tag.log"
}
graph_pair() {  # graph_pair TAG [bench args]: the time-to-target shape at 8/80, cuda_graph true then false
  local tag=$1; shift
  for g in true false; do
    bench_plain "${tag}_$g" "update_freq=8,root_freq=80,cuda_graph=$g" --vocab 8192 --batch 16 --seq 512 "$@"
  done
}
for part in "$@"; do
  case $part in
    tests_graph)  # the CUDA graph's checks alone
      python -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda_graph.py 2>&1 | tail -30 > "$out/tests_graph.log" ;;
    tests)
      python -m pytest -q -p no:cacheprovider -p no:logging --tb=short tests/test_cuda.py tests/test_cuda_warmup.py tests/test_cuda_graph.py 2>&1 | grep -v DEBUG | tail -120 > "$out/tests.log" ;;
    bench)
      bench 100 update_freq=100,root_freq=100
      bench 10 update_freq=10,root_freq=100
      bench 1 update_freq=1,root_freq=100 ;;
    q4adamw)  # Q4AdamW (issue 15) beside fused AdamW and the peers that are installed, one process
      fresh_caches
      python -m hf_q4shampoo.bench --optimizers adamw,q4adamw,q4adamw_factor,q4adamw_linear2,adamw_4bit,adamw_8bit \
        --steps 200 --warmup 20 --json "$out/bench_q4adamw.json" > "$out/bench_q4adamw.log" 2>&1
      tail -8 "$out/bench_q4adamw.log" ;;
    bench_fused)  # the Triton statistics update (fused_statistics=true), default layout, update_freq 1 and 10
      bench 1f update_freq=1,root_freq=100,fused_statistics=true
      bench 10f update_freq=10,root_freq=100,fused_statistics=true ;;
    bench_fused_paper1)  # the same on paper 1's layout (feedback, row), the v10 measurement
      bench 1fp update_freq=1,root_freq=100,fused_statistics=true,factor_upper=feedback,factor_scaling=row
      bench 10fp update_freq=10,root_freq=100,fused_statistics=true,factor_upper=feedback,factor_scaling=row ;;
    first_step)  # the first optimizer.step() from empty caches, warm-ups compiled in parallel and one by one
      for mode in parallel serial; do
        fresh_caches
        python benchmarks/first_step_probe.py --top 60 $([ $mode = serial ] && echo --serial) \
          > "$out/first_step_$mode.log" 2>&1; head -1 "$out/first_step_$mode.log"
      done ;;
    launches:*)  # launches:DIR: the steady step's host time on the time-to-target shape, code in DIR vs this tree
      # (run from inside DIR: `python -m` puts the working directory ahead of PYTHONPATH, so from here both runs
      # imported this tree's package, until 2026-12-02: perf_notes v27)
      for tree in "${part#launches:}" .; do
        fresh_caches; tag=$(basename "$(realpath "$tree")"); dest=$(realpath "$out")
        (cd "$tree" && PYTHONPATH=$PWD python -m hf_q4shampoo.bench --optimizers adamw,q4shampoo --vocab 8192 \
          --batch 16 --seq 512 --steps 200 --warmup 20 --optim_args update_freq=8,root_freq=80 \
          --json "$dest/launches_$tag.json" > "$dest/launches_$tag.log" 2>&1); tail -3 "$out/launches_$tag.log"
      done ;;
    graph)  # the issue-11 targets' three schedules on GPT-2 small at the defaults (cuda_graph="auto": the trial decides)
      bench_plain g100 update_freq=100,root_freq=100
      bench_plain g10 update_freq=10,root_freq=100
      bench_plain g1 update_freq=1,root_freq=100 ;;
    graph_ttt)  # the time-to-target model's shape, captured and eager updates
      graph_pair ttt_graph ;;
    graph_kept)  # the same with gradients zeroed in place (fixed addresses), 400 steps
      graph_pair kept_graph --keep_grads --steps 400 ;;
    cholesky)  # batched Cholesky, cuSOLVER against MAGMA: host and GPU time per call (the next lever after v18)
      python benchmarks/cholesky_backend.py --json "$out/cholesky_backend.json" > "$out/cholesky_backend.log" 2>&1
      tail -8 "$out/cholesky_backend.log" ;;
    host_profile)  # host time of forward / backward / step() on the time-to-target shape, eager and graphed
      for g in false true; do
        python benchmarks/host_profile.py --plain --optim_args update_freq=8,root_freq=80,cuda_graph=$g \
          --json "$out/host_plain_$g.json" > "$out/host_plain_$g.log" 2>&1; tail -1 "$out/host_plain_$g.log"
      done ;;
    spread)  # GPT-2 small at 10/100 with fewer, larger refresh batches (refresh_spread 5 and 10 against 25)
      for sp in 5 10 25; do bench_plain spread$sp update_freq=10,root_freq=100,refresh_spread=$sp; done ;;
    graph_small)  # GPT-2 small at 10/100 with the graphed update, then the eager one
      bench_plain g10_graph update_freq=10,root_freq=100,cuda_graph=true
      bench_plain g10_eager update_freq=10,root_freq=100,cuda_graph=false ;;
    ab_host:*)  # ab_host:OLD:OPTIMIZER[:OPTIM_ARGS]: step() host time of OLD (a carried folder holding the old
      # hf_q4shampoo/, made with git archive: benchmarks/ab_host.py) against this tree, ABBA order, 2 pairs
      IFS=: read -r _ rev opt args <<< "$part"
      python benchmarks/ab_host.py --old "$rev" --pairs 2 --out "$out/ab_host_${opt}" -- --optimizer "$opt" \
        ${args:+--optim_args "$args"} > "$out/ab_host_${opt}.log" 2>&1; tail -12 "$out/ab_host_${opt}.log" ;;
    bench:*)  # bench:TAG:OPTIM_ARGS (OPTIM_ARGS comma-separated, as --optim_args takes them)
      spec=${part#bench:}; bench "${spec%%:*}" "${spec#*:}" ;;
    ttt_tree:*)  # ttt_tree:DIR:RUN,...: as ttt:, run by the code of DIR, an older commit's tree carried along
      # (git archive COMMIT hf_q4shampoo benchmarks recipes | tar -x -C DIR), for a same-call comparison
      IFS=: read -r _ tree runs <<< "$part"
      fresh_caches; dir=ttt_$(basename "$tree")${TTT_SEED:+_s$TTT_SEED}
      q4=(); for spec in ${TTT_Q4:-}; do q4+=(--q4 "$spec"); done
      PYTHONPATH=$(realpath "$tree") python "$tree/benchmarks/time_to_target.py" --data .ttt_data --out "$out/$dir" \
        --only "$runs" "${q4[@]}" ${TTT_SEED:+--seed "$TTT_SEED"} > "$out/${dir}_$runs.log" 2>&1
      tail -8 "$out/${dir}_$runs.log"; tar -czf "$out/${dir}_runs.tgz" -C "$out/$dir" runs ;;
    ttt:*)  # ttt:RUN,RUN,... (names as in time_to_target.py --only); run files packed into one archive
      # TTT_SEED (optional): initial weights and batch order (time_to_target.py --seed); its runs go to ttt_sSEED
      fresh_caches; dir=ttt${TTT_SEED:+_s$TTT_SEED}
      q4=(); for spec in ${TTT_Q4:-}; do q4+=(--q4 "$spec"); done
      for spec in ${TTT_FIRST_ORDER:-}; do q4+=(--first_order "$spec"); done
      python benchmarks/time_to_target.py --data .ttt_data --out "$out/$dir" --only "${part#ttt:}" "${q4[@]}" \
        ${TTT_ADAMW+--adamw_lrs "$TTT_ADAMW"} ${TTT_SEED:+--seed "$TTT_SEED"} \
        > "$out/${dir}_${part#ttt:}.log" 2>&1; tail -8 "$out/${dir}_${part#ttt:}.log"
      tar -czf "$out/${dir}_runs.tgz" -C "$out/$dir" runs ;;
  esac
done
