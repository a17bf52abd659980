#!/usr/bin/env bash
# Issues 19 and 20 on organism:small, one GPU, spread over several device calls of < 10 minutes each on
# one warm machine. Every stage is resumable and skipped once complete, so the same command is simply
# run again in the next call (a cold machine starts over from the build; nothing is lost but time):
#   1. the small organism (benchmarks/organism_build.py, timed), and beside it the letter-format organism
#      (organism_build.py --preset small-letter; issue 20);
#   2. then, side by side on the one GPU (the 32-layer hidden-256 model leaves most of it idle):
#      a. the boundary search: benchmarks/tune_small.py (24 Optuna trials; issue 19);
#      b. the chain: the README main job (configs/organism_small.yaml) -> UNDO from it (configs/undo_small.yaml)
#         -> the methods x attacks table (benchmarks/attack_table_small.py; issue 20);
# Usage: bash benchmarks/small_session.sh OUT_DIR [BUDGET_S]. Needs .bench/whl/ (optuna and its dependencies).
# CPU smoke test of the whole script on tiny: SMOKE=1 bash benchmarks/small_session.sh /tmp/smoke 1200
# ONLY=tune: the build and the boundary search alone, all the GPU's share to it (JOBS trials at once, default 6).
# ONLY=chain: the build, the chain and the letter build, no boundary search (the main job then has the GPU).
# UNDO_ARGS='--undo.pretrain_fraction 0.3': overrides for the UNDO run; ATTACKS=full,lora16,probe,icl: the table's attacks.
# State lives in .gpu/ (in .gitignore, not carried, so a warm machine keeps it between calls: a folder only in
# .git/info/exclude is not ignored on the device and is removed before the next call); the summaries
# are copied to OUT_DIR at the end of every call.
set -uo pipefail
out=${1:?OUT_DIR}; budget=${2:-560}
t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
stamp() { echo "== $1 at $(( $(date +%s) - t0 )) s"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
g=$PWD/.gpu; mkdir -p "$g/log" "$g/runs" "$g/docs" "$out"
export UNLEARNING_HOME=$g/home UNLEARNING_RUNS=$g/runs
p=small; undo=undo_small; tune_args=(); attack_args=(); letter_s=330
if [[ -n ${SMOKE:-} ]]; then  # tiny, a few steps of everything, the organism cache of this machine
  g=$PWD/.gpu-smoke; mkdir -p "$g/log" "$g/runs" "$g/docs"; export UNLEARNING_RUNS=$g/runs UNLEARNING_HOME=${UNLEARNING_HOME_SMOKE:-$UNLEARNING_HOME}
  p=tiny; undo=undo_pretrain_tiny; letter_s=120
  tune_args=(--preset tiny --config configs/organism_tiny.yaml --trials 3 --jobs 2 --steps-per-layer 2 --limit 16)
  attack_args=(--preset tiny --steps 4 --lr 1e-4)
fi
if [[ -n ${SMOKE:-} ]]; then :
elif [[ ! -f $g/site/.done ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$g/site" .bench/whl/*.whl \
    && touch "$g/site/.done" || exit 1
fi
export PYTHONPATH=$g/site:$PWD/src
[[ -n ${SMOKE:-} ]] || { nvidia-smi -L; nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader; }
unl() { python3 -m unlearning.cli "$@"; }
complete() { python3 -c "import json,sys; sys.exit(json.load(open('$1/results.json')).get('status') != 'complete')" 2>/dev/null; }

# 1b. the letter-format organism, beside the build (the hidden-256 model leaves most of the GPU idle, so the
# two builds cost little more than one; its timing is its own preset's budget, not the 3-minute build)
if [[ ! -f $g/log/build_$p-letter.json && ${ONLY:-} != tune ]]; then
  ( if (( $(left) > letter_s )); then  # a letter build that cannot finish in this call waits for the next
      timeout $(( $(left) - 20 )) python3 benchmarks/organism_build.py --preset $p-letter \
        --out "$g/log/build_$p-letter.json.tmp" > "$g/log/letter.log" 2>&1
      [[ -f $g/log/build_$p-letter.json.tmp ]] && mv "$g/log/build_$p-letter.json.tmp" "$g/log/build_$p-letter.json"
    fi ) &
fi

# 1. the organism (its timing is issue 18's "both twins <= 3 min", shared with the letter build when that runs)
if [[ ! -f $g/log/build_$p.json ]]; then
  stamp "build $p"
  python3 benchmarks/organism_build.py --preset $p --out "$g/log/build_$p.json.tmp" $( [[ -n ${SMOKE:-} ]] && echo --reuse ) \
    2>&1 | grep -v "it/s]$" | tail -25  # exits 1 when a quality bar is missed: the summary is still the result
  [[ -f $g/log/build_$p.json.tmp ]] && mv "$g/log/build_$p.json.tmp" "$g/log/build_$p.json"
fi
[[ -f $g/log/build_$p.json ]] || { echo "the $p organism did not build"; exit 1; }

# 2a. the boundary search (stops starting trials 100 s before the budget; a rerun resumes the study)
if [[ ${ONLY:-} != chain ]]; then stamp "tune (background)"
( timeout $(( $(left) - 20 )) python3 benchmarks/tune_small.py --out "$g/runs/tune_small" --jobs ${JOBS:-6} \
    --deadline $(( $(left) - ${MARGIN:-100} )) --copy-to "$g/docs" "${tune_args[@]}" > "$g/log/tune.log" 2>&1 ) &
fi

if [[ ${ONLY:-} == tune ]]; then wait; fi
# 2b. main job -> UNDO -> attack table
chain() {
  complete "$g/runs/main" || unl run configs/organism_$p.yaml --name main --output_dir "$g/runs" $( [[ -d $g/runs/main ]] && echo --resume ) \
    || return 1
  complete "$g/runs/undo" || unl run configs/$undo.yaml --model "$g/runs/main" --name undo --output_dir "$g/runs" ${UNDO_ARGS:-} \
    $( [[ -d $g/runs/undo ]] && echo --resume ) || return 1
  python3 benchmarks/attack_table_small.py "$g/runs/main" "$g/runs/undo" --docs "$g/docs" --attacks "${ATTACKS:-full,lora16,lora64,probe,icl}" "${attack_args[@]}"
}
[[ ${ONLY:-} == tune ]] || { stamp "chain (background)"
( timeout $(( $(left) - 20 )) bash -c "$(declare -f unl complete chain); g=$g p=$p undo=$undo; UNDO_ARGS='${UNDO_ARGS:-}' ATTACKS=${ATTACKS:-full,lora16,lora64,probe,icl}; attack_args=(${attack_args[*]}); chain" \
    > "$g/log/chain.log" 2>&1 ) & }


wait
stamp "all stages stopped"
nvidia-smi --query-gpu=memory.used --format=csv,noheader
for f in tune chain letter; do echo "---- $f (tail)"; grep -v "it/s]$\|it/s, " "$g/log/$f.log" 2>/dev/null | tail -25; done
ls "$g/runs" "$g/docs"
# the summaries that come back (8 files at most)
cp "$g/log/build_$p.json" "$g/log/build_$p-letter.json" "$out/" 2>/dev/null
cp "$g/docs/pareto.md" "$g/docs/pareto.png" "$out/" 2>/dev/null
cp "$g/docs/attack_table_$p.md" "$g/docs/attack_table_$p.png" "$out/" 2>/dev/null
python3 - "$g" "$out" <<'EOF'
import json, sys
from pathlib import Path
g, out = Path(sys.argv[1]), Path(sys.argv[2])
keep = {}
for name in ("main", "undo"):
    p = g / "runs" / name / "results.json"
    if p.is_file():
        r = json.loads(p.read_text())
        keep[name] = {k: r.get(k) for k in ("status", "before", "after", "reference", "reference_model",
                                             "train_summary", "timings", "elapsed_s")}
(out / "runs_summary.json").write_text(json.dumps(keep, indent=1, default=str))
print(json.dumps({n: {k: v.get("after") for k, v in [("r", r)]} for n, r in keep.items()}, default=str)[:3000])
EOF
