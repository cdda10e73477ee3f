#!/usr/bin/env bash
# Issue 7's GPU checks, prepared as one command for a lent GPU machine (not a test):
#
#  1. bench/train.py --device cuda: one G+D step of the paper preset at batch 72 and of the
#     toy preset, images/s, peak memory, fraction of the GPU's float32 / TF32 matmul rate;
#  2. the toy GAN trained on the GPU from a finished demo's artifacts, three runs at once
#     (the preset at seeds 0 and 1, and the preset before session 12: BN discriminators,
#     TISCL weight 20), each trained in segments (SCHEDULE, cumulative epochs, resumed) and
#     scored by cpgan-eval after each, the last stage and the first (--stage 0): how SOA-C
#     and R-precision move with up to 10 times the demo's 3 epochs, until GAN_SECONDS run out.
#
# Here, pack what part 2 reads from a finished demo (toy-coco/, vocab.json, memory.h5 and
# models/{damsm,damsm-no-memory,detector,classifier}.pt with their records; about 43 MB):
#
#     bash bench/gpu_checks.sh pack ARTIFACTS .gpu/A.tar.gz
#
# and fetch the wheel of pycocotools for the GPU machine's Python 3.12 into .whl/ (the device
# tool's README says how); both folders are git-ignored through .git/info/exclude. There, with
# .gpu and .whl carried:
#
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#     PYTHONPATH=/tmp/site bash bench/gpu_checks.sh .gpu/A.tar.gz $OUT
#
# The package is used in place (PYTHONPATH), not installed: the GPU machine has its own torch.
# Environment: DEVICE (cuda), SCHEDULE ("3 10 30"), GAN_SECONDS (deadline of part 2),
# BENCH_ARGS (empty: skip part 1), TRAIN_EXTRA / EVAL_EXTRA (extra options, e.g. --limit for
# a dry run on CPU), PY (python3).
set -u
if [[ "${1:-}" == pack ]]; then
    root=$(realpath "$2"); target=$(realpath -m "$3"); stage=$(mktemp -d)
    mkdir -p "$stage/A/models" "$(dirname "$target")"
    cp -al "$root/toy-coco" "$stage/A/"
    for f in vocab.json vocab.provenance.json memory.h5 memory.provenance.json \
             memory_index.parquet memory_purity.json; do cp -l "$root/$f" "$stage/A/"; done
    for f in damsm damsm-no-memory detector classifier; do
        cp -l "$root/models/$f".* "$stage/A/models/"
    done
    rm -f "$stage"/A/models/*.ckpt.pt "$stage"/A/models/detector.weights
    tar czf "$target" -C "$stage" A && rm -rf "$stage" && ls -l "$target"
    exit
fi
tarball=$(realpath "$1"); out=$(realpath "$2")
DEVICE=${DEVICE:-cuda}
SCHEDULE=${SCHEDULE:-"3 10 30"}
GAN_SECONDS=${GAN_SECONDS:-330}
BENCH_ARGS=${BENCH_ARGS-"--presets paper,toy --paper-batch 72 --seconds 10"}
TRAIN_EXTRA=${TRAIN_EXTRA:-}
EVAL_EXTRA=${EVAL_EXTRA:-}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2

# the package as setup.py maps it: cpgan/ plus the four top-level folders
pkg=$(mktemp -d)
mkdir "$pkg/cpgan"
ln -s "$PWD"/cpgan/*.py "$pkg/cpgan/"
for d in pipeline model trainer cli; do ln -s "$PWD/$d" "$pkg/cpgan/$d"; done
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"

{ date -u; nvidia-smi 2>&1 | head -15; $PY -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.is_available())"; } > "$out/env.txt" 2>&1

# ---- 1. one training step, both presets
if [[ -n "$BENCH_ARGS" ]]; then
start=$(date +%s)
# shellcheck disable=SC2086
$PY bench/train.py --device "$DEVICE" $BENCH_ARGS > "$out/train_bench.json" 2> "$out/train_bench.log"
echo "bench/train.py: rc $? in $(( $(date +%s) - start )) s" >> "$out/env.txt"
fi

# ---- 2. toy GAN runs on the GPU
work=$(mktemp -d)
tar xzf "$tarball" -C "$work"
A=$work/A
printf 'seed = 0\n' > "$work/s0.toml"
printf 'seed = 1\n' > "$work/s1.toml"
printf 'seed = 0\n[gan]\nd_norm = "batch"\ntiscl_lambda = 20.0\n' > "$work/old.toml"
deadline=$(( $(date +%s) + GAN_SECONDS ))
cd "$work"  # not the repo root, whose cpgan/ would shadow the mapped package for 'python -c'

chain() {  # chain NAME CONFIG: train to each cumulative epoch count, evaluate after each
    local name=$1 cfg=$2 resume="" left
    for epochs in $SCHEDULE; do
        left=$(( deadline - $(date +%s) ))
        if (( left < 20 )); then echo "$name: out of time before $epochs epochs"; return; fi
        # shellcheck disable=SC2086
        if ! timeout "$left" $PY -c "from cpgan.cli.train import main; main()" --stage gan \
                --artifacts "$A" --config "$cfg" --name "$name" --epochs "$epochs" $resume \
                --device "$DEVICE" --workers 3 $TRAIN_EXTRA > "$work/$name-$epochs.train.log" 2>&1; then
            echo "$name: training to $epochs epochs failed or ran out of time:"
            tail -c 1500 "$work/$name-$epochs.train.log"; return
        fi
        grep "^gan \[" "$work/$name-$epochs.train.log"
        # shellcheck disable=SC2086
        $PY -c "from cpgan.cli.evaluate import main; main()" --artifacts "$A" --config "$cfg" \
            --checkpoint "$A/runs/$name/checkpoint.pt" --report-dir "$work/report-$name-$epochs" \
            --device "$DEVICE" --workers 2 $EVAL_EXTRA > "$work/$name-$epochs.eval.log" 2>&1 \
            || { echo "$name: evaluation failed:"; tail -c 1500 "$work/$name-$epochs.eval.log"; return; }
        tail -n 1 "$work/$name-$epochs.eval.log"
        # the first stage too: does it learn to draw the caption with more steps? (RESULTS.md)
        # shellcheck disable=SC2086
        $PY -c "from cpgan.cli.evaluate import main; main()" --artifacts "$A" --config "$cfg" \
            --checkpoint "$A/runs/$name/checkpoint.pt" --stage 0 \
            --report-dir "$work/report-$name-$epochs-stage0" --device "$DEVICE" --workers 2 \
            $EVAL_EXTRA > "$work/$name-$epochs.stage0.log" 2>&1
        tail -n 1 "$work/$name-$epochs.stage0.log"
        resume=--resume
    done
}

chain gpu-s0 "$work/s0.toml" > "$work/gpu-s0.summary" 2>&1 &
chain gpu-s1 "$work/s1.toml" > "$work/gpu-s1.summary" 2>&1 &
chain gpu-old "$work/old.toml" > "$work/gpu-old.summary" 2>&1 &
wait
cat "$work"/*.summary > "$out/gan.txt"
echo "part 2: $(( $(date +%s) - deadline + GAN_SECONDS )) s" >> "$out/gan.txt"
(cd "$work" && tar czf "$out/gan_reports.tar.gz" report-*/report.json \
    report-*/samples-generated.png A/runs/*/metrics.jsonl A/runs/*/config.json ./*.log) 2>/dev/null
ls -la "$out"
