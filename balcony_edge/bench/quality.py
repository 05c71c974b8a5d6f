"""Each exit's perplexity, to put beside its speed: from `balcony-edge eval --json` output, or a short eval in torch."""

from __future__ import annotations

import json
from pathlib import Path

from balcony_edge.common.errors import BalconyError

SHORT_EVAL_TOKENS = 4096


def perplexities_from_eval(eval_json: dict, num_layers: int) -> dict[int, float]:
    """exit -> perplexity from an `eval --json` object; the full model under num_layers."""
    try:
        table = {int(e["exit"]): float(e["ppl"]) for e in eval_json["exits"]}
        table[num_layers] = float(eval_json["full"]["ppl"])
    except (KeyError, TypeError, ValueError) as err:
        raise BalconyError(
            f"the eval file is not `balcony-edge eval --json` output ({err!r}); write it with that command"
        ) from None
    return table


def read_eval_file(path: Path, num_layers: int) -> dict[int, float]:
    """Perplexities from a file written by `balcony-edge eval --json > eval.json`."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BalconyError(
            f"cannot read the eval file {path} ({err}); write it with `balcony-edge eval --json > eval.json`"
        ) from None
    return perplexities_from_eval(raw, num_layers)


def short_eval(checkpoint: Path, max_tokens: int = SHORT_EVAL_TOKENS, seq_len: int = 512) -> dict[int, float]:
    """Held-out perplexity per exit of a checkpoint in torch, on the default corpus's first max_tokens held-out
    tokens."""
    from balcony_edge.checkpoint import load_checkpoint
    from balcony_edge.data import load_corpus, pack
    from balcony_edge.evaluate import evaluate

    model, _, loaded = load_checkpoint(checkpoint)
    blocks = pack(load_corpus(None).held_out, loaded.tokenizer, seq_len, what="evaluation")[
        : max(1, max_tokens // seq_len)
    ]
    return perplexities_from_eval(evaluate(model, blocks, show_progress=False).to_json(), model.num_layers)
