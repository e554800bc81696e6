#!/usr/bin/env bash
# The main job on an embedded default, no cluster: fine-tunes MiniLM on BBC News locally.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.tools:$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec finetune run "$@"
