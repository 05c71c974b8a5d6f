"""Per-exit quality of a checkpoint on several kinds of text, one JSON line per kind, and a markdown table.

    python scripts/unseen_texts.py --out eval-texts
    python scripts/quality_by_kind.py [CHECKPOINT] --texts eval-texts [--held-out data/teacher_chat.jsonl
    data-extra/code.jsonl] [--device cuda]

Kinds: the held-out 5% of the default corpus (news), the held-out 5% of every --held-out training corpus, and
every eval-texts/*.jsonl (files the balconies never trained on; --trained-kinds names those whose kind training
saw in other files, so the table says so). The first --max-tokens tokens of each are predicted.
"""

import argparse
import json
from pathlib import Path

from balcony_edge.checkpoint import load_checkpoint
from balcony_edge.data import JSONL_SUFFIXES, data_stem, data_suffix, load_corpus, pack, read_documents
from balcony_edge.evaluate import evaluate

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint", nargs="?", type=Path, default=None)
parser.add_argument("--texts", type=Path, required=True)
parser.add_argument(
    "--held-out", type=Path, nargs="*", default=[], help="training corpora whose held-out 5%% to measure"
)
parser.add_argument("--trained-kinds", nargs="*", default=[], help="eval-texts kinds that training saw in other files")
parser.add_argument("--max-tokens", type=int, default=16384)
parser.add_argument("--device", default="cpu", help="torch device to evaluate on (cuda on a GPU machine)")
args = parser.parse_args()

model, info, loaded = load_checkpoint(args.checkpoint, None)
model.to(args.device)
kinds = {"news (held out)": load_corpus(None).held_out}
held_out = {f"{data_stem(path)} (held out)": path for path in args.held_out}


def unseen_label(kind: str) -> str:
    return f"{kind} (other files of a trained kind)" if kind in args.trained_kinds else f"{kind} (never trained on)"


texts = [path for path in sorted(args.texts.iterdir()) if data_suffix(path) in JSONL_SUFFIXES]
unseen = {unseen_label(data_stem(path)): path for path in texts}
if len(held_out) < len(args.held_out) or len(unseen) < len(texts):
    raise SystemExit("two texts share a name (the file name without .jsonl and .xz/.gz); rename one")
kinds |= {label: load_corpus([path]).held_out for label, path in held_out.items()}
kinds |= {label: read_documents([path]) for label, path in unseen.items()}
rows = []
for kind, documents in kinds.items():
    blocks = pack(documents, loaded.tokenizer, 512, what="evaluation")[: max(1, args.max_tokens // 512)]
    result = evaluate(model, blocks, show_progress=False)
    print(json.dumps({"kind": kind, **result.to_json()}), flush=True)
    rows.append((kind, result))
print(
    "\n| text | tokens | full ppl | x full @"
    + " / @".join(str(e.exit) for e in rows[0][1].exits)
    + " | top-1 @"
    + " / @".join(str(e.exit) for e in rows[0][1].exits)
    + " |"
)
print("| --- | --- | --- | --- | --- |")
for kind, result in rows:
    ratios = " / ".join(f"{e.ppl / result.full_ppl:.2f}" for e in result.exits)
    top1 = " / ".join(f"{e.top1_agreement:.3f}" for e in result.exits)
    print(f"| {kind} | {result.tokens:,} | {result.full_ppl:.1f} | {ratios} | {top1} |")
