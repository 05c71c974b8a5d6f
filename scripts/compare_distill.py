"""Distillation over the whole vocabulary against the union of the teacher's top-k tokens: a short identical
training run each, then held-out KL over the WHOLE vocabulary, top-1 agreement and training tokens/s.

python scripts/compare_distill.py --steps 16 --top-k 0,32     (the README's "Training throughput" table)
"""

import argparse
import json
import tempfile

from balcony_edge.base_model import load_base_model
from balcony_edge.data import load_corpus, pack
from balcony_edge.evaluate import evaluate
from balcony_edge.train import TrainConfig, Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=16)
parser.add_argument("--top-k", default="0,32", help="comma-separated; 0: the whole vocabulary")
parser.add_argument("--precision", default="auto")
args = parser.parse_args()

base = load_base_model()
held_out = pack(load_corpus(None).held_out, base.tokenizer, 512)[:8]
for top_k in (int(k) for k in args.top_k.split(",")):
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            exits=(8, 16, 24),
            out=out,
            batch_size=8,
            micro_batch_size=4,
            max_tokens=args.steps * 8 * 512,
            precision=args.precision,
            distill_top_k=top_k,
        )
        trainer = Trainer(config, base=base)
        summary = trainer.run()
        quality = evaluate(trainer.model, held_out, show_progress=False)
        result = {e.exit: {"kl": round(e.kl, 4), "top1": round(e.top1_agreement, 4)} for e in quality.exits}
        rate = summary["tokens_seen"] / summary["wall_seconds"]
        print(
            json.dumps(
                {"top_k": top_k, "precision": summary["precision"], "steps": args.steps, "tokens_per_second": round(rate), "held_out_full_vocab": result}
            ),
            flush=True,
        )
