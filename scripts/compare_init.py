"""Compare balcony / exit-norm initialisations: a short identical training run each, then held-out KL and top-1.

python scripts/compare_init.py --steps 12     (the README's "Initialisation" table came from this)
"""

import argparse
import json
import tempfile

from balcony_edge.base_model import load_base_model
from balcony_edge.data import load_corpus, pack
from balcony_edge.evaluate import evaluate
from balcony_edge.train import TrainConfig, Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--exits", default="8,16,24")
args = parser.parse_args()

base = load_base_model()
held_out = pack(load_corpus(None).held_out, base.tokenizer, 512)[:8]
for balcony_init, norm_init in (("last", "final"), ("last", "exit_input"), ("random", "final")):
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            exits=tuple(int(k) for k in args.exits.split(",")),
            out=out,
            batch_size=8,
            micro_batch_size=4,
            max_tokens=args.steps * 8 * 512,
            precision="bf16",
            balcony_init=balcony_init,
            norm_init=norm_init,
        )
        trainer = Trainer(config, base=base)
        trainer.run()
        quality = evaluate(trainer.model, held_out, show_progress=False)
        result = {e.exit: {"kl": round(e.kl, 4), "top1": round(e.top1_agreement, 4)} for e in quality.exits}
        print(json.dumps({"balcony_init": balcony_init, "norm_init": norm_init, "steps": args.steps, "held_out": result}), flush=True)
