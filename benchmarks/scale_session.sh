#!/usr/bin/env bash
# Issue 18's one-GPU table in one call: training (project vs reference) and evaluation
# (project vs lm-eval 0.4.13) on the random-weight 6.9B GPT-NeoX. Needs .bench/ (see benchmarks/README.md):
#   .bench/whl/*.whl           lm-eval 0.4.13 and the dependencies the GPU image lacks
#   .bench/home/real/          the real MMLU questions and the GPT-NeoX-20B tokenizer (python -m unlearning.data.real extract)
# Usage: bash benchmarks/scale_session.sh OUT_DIR [train] [eval] [commands]   (WORKLOADS=cb_lora: only those training rows)
set -uo pipefail
out=${1:?OUT_DIR}; shift
parts=${*:-train eval commands}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export UNLEARNING_HOME=$PWD/.bench/home
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .bench/whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
mkdir -p "$out"; nvidia-smi -L; t0=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - t0 )) s"; }
python3 benchmarks/wmdp_shaped.py /tmp/wmdp.parquet
MMLU=$UNLEARNING_HOME/real/mmlu/test.parquet
if [[ $parts == *train* ]]; then
  stamp train; python3 benchmarks/scale_train.py --workloads "${WORKLOADS:-seq_full,seq_lora,cb_lora}" --out "$out/scale_train.json" 2>&1 | grep -v "it/s]$"
fi
if [[ $parts == *eval* ]]; then
  stamp eval-wmdp
  python3 benchmarks/lmeval_reference.py --random-neox --model /tmp/neox --tasks wmdp_bio=/tmp/wmdp.parquet \
    --batch-size auto 32 64 --compare --our-batch-size 32 64 128 --out "$out/eval_wmdp.json" | tail -40
  stamp eval-mmlu
  python3 benchmarks/lmeval_reference.py --model /tmp/neox --tasks mmlu=$MMLU \
    --batch-size auto 64 --compare --our-batch-size 32 64 --out "$out/eval_mmlu.json" | tail -40
fi
if [[ $parts == *fp32* ]]; then
  [[ -d /tmp/neox ]] || python3 benchmarks/lmeval_reference.py --random-neox --model /tmp/neox --tasks wmdp_bio=/tmp/wmdp.parquet --limit 1 >/dev/null
  stamp eval-fp32
  python3 benchmarks/lmeval_reference.py --model /tmp/neox --tasks wmdp_bio=/tmp/wmdp.parquet --limit 200 \
    --dtype float32 --batch-size 32 --compare --out "$out/eval_fp32.json" | tail -30
fi
if [[ $parts == *commands* ]]; then
  [[ -d /tmp/neox ]] || python3 benchmarks/lmeval_reference.py --random-neox --model /tmp/neox --tasks wmdp_bio=/tmp/wmdp.parquet --limit 1 >/dev/null
  for t in "wmdp_bio=/tmp/wmdp.parquet" "mmlu=$MMLU"; do
    stamp "project command $t"
    s=$(date +%s%N); python3 -m unlearning.cli eval --model /tmp/neox --tasks "$t" --dtype bf16 --batch-size 64 \
      --output-dir /tmp/ev-$RANDOM 2>&1 | tail -4; echo "project_command_s $t $(( ($(date +%s%N) - s) / 1000000 )) ms"
  done
  stamp "lm-eval commands"
  python3 benchmarks/lmeval_reference.py --model /tmp/neox --tasks wmdp_bio=/tmp/wmdp.parquet --batch-size auto \
    --command --out "$out/command_wmdp.json" | grep -A3 '"command"'
fi
if [[ $parts == *mmlucmd* ]]; then
  python3 benchmarks/lmeval_reference.py --model /tmp/neox --tasks mmlu=$MMLU --batch-size auto \
    --command --out "$out/command_mmlu.json" | grep -A3 '"command"'
fi
stamp done
