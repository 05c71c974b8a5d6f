"""A bench result shown: the rich table, the summary lines against the targets, and the speed/quality plot."""

from __future__ import annotations

from balcony_edge.common.atomic import atomic_path

# The targets (ratios measured side by side in one run): docs/benchmarks.md ("What each number means") says how each is
# measured.
TARGETS = {
    "vs_floor": 0.95,  # every exit at least this fraction of its plain truncated model
    "engine_vs_bare": 0.95,
    "engine_vs_torch": 1.4,
    "engine_vs_llama_cpp": 1.0,  # full depth against llama.cpp's full model at the same precision (float)
    "engine_vs_llama_cpp_q4": 0.85,  # the same at 4 bits (q4_0)
    "vs_llama_cpp_full": 1.0,  # every exit short of full depth faster than llama.cpp's full model
    "vs_genai": 0.95,  # every exit against onnxruntime-genai's own loop on the exit's graph
    "neighbour_ratio": 0.85,  # full depth beside one busy core against quiet
    "switch_cost_16": 2.0,  # at most, in decode steps of the deep exit
    "context_2000": 1.3,  # at most: a step after 2,000 tokens of context over one after 64
    "memory_ratio_all_vs_full": 1.15,  # at most
}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def exits_table(result: dict):
    """Per exit: decode, floor, ratio, prefill, first token, weights per token, bandwidth, perplexity."""
    from rich.table import Table

    title = (
        f"{result['precision']} on {result['provider']}, {result['machine']['cpu'] or 'this machine'}, "
        f"threads {result['threads'] or 'default'}, prepack {'on' if result['prepack'] else 'off'}; "
        f"medians of {result['repeats']}: {result['new_tokens']} "
        f"new tokens after a {result['prompt_tokens']}-token prompt"
    )
    caption = (
        "tok/s: decode; floor: the base cut to the same depth; x "
        "fl: tok/s / floor; x lcpp: tok/s / llama.cpp's full model; "
        "prefill: tok/s; TTFT: ms; MB/t: weights read per token"
    )
    table = Table(title=title, caption=caption)
    for column in ("exit", "tok/s", "floor", "x fl", "x lcpp", "prefill", "TTFT", "MB/t", "GB/s", "ppl"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in result["exits"]:
        table.add_row(
            "full" if row["full"] else str(row["exit"]),
            _fmt(row["decode_tok_s"], ".1f"),
            _fmt(row["floor_tok_s"], ".1f"),
            _fmt(row["vs_floor"], ".2f"),
            _fmt(row.get("vs_llama_cpp_full"), ".2f"),
            _fmt(row["prefill_tok_s"], ".0f"),
            _fmt(row["ttft_ms"], ".0f"),
            f"{row['weight_bytes_per_token'] / 1e6:.0f}",
            _fmt(row["bandwidth_gb_s"], ".1f"),
            _fmt(row["ppl"], ".1f"),
        )
    return table


def target_lines(result: dict) -> list[str]:
    """One line per target: the measured ratio, the target, met or missed."""
    lines = []

    def line(name: str, value, target: float, at_most: bool = False) -> None:
        if value is None:
            lines.append(f"{name}: not measured")
            return
        met = value <= target if at_most else value >= target
        sign = "<=" if at_most else ">="
        lines.append(f"{name}: {value:.2f} (target {sign} {target}) {'met' if met else 'MISSED'}")

    floors = [row["vs_floor"] for row in result["exits"] if row["vs_floor"] is not None]
    line("slowest exit / floor", min(floors) if floors else None, TARGETS["vs_floor"])
    line("engine / bare loop (full)", result.get("engine_vs_bare"), TARGETS["engine_vs_bare"])
    line("engine / torch generate (full)", result.get("engine_vs_torch"), TARGETS["engine_vs_torch"])
    precision = result.get("llama_cpp_precision") or ""
    full_target = TARGETS["engine_vs_llama_cpp_q4" if precision.startswith("q4") else "engine_vs_llama_cpp"]
    line(f"engine / llama.cpp {precision} (full)", result.get("engine_vs_llama_cpp"), full_target)
    against_llama = [
        row.get("vs_llama_cpp_full")
        for row in result["exits"]
        if row.get("vs_llama_cpp_full") is not None and not row["full"]
    ]
    line("slowest exit / llama.cpp full", min(against_llama) if against_llama else None, TARGETS["vs_llama_cpp_full"])
    same_exit = [
        f"{'full' if row['full'] else row['exit']} {row['vs_llama_cpp_same_exit']:.2f}"
        for row in result["exits"]
        if row.get("vs_llama_cpp_same_exit")
    ]
    if same_exit:
        lines.append(f"engine / llama.cpp on the same exit's GGUF: {', '.join(same_exit)} (no target)")
    genai = [row["vs_genai"] for row in result["exits"] if row.get("vs_genai")]
    if genai:
        line("slowest exit / onnxruntime-genai on its graph", min(genai), TARGETS["vs_genai"])
    line("full depth beside one busy core / quiet", result.get("neighbour_ratio"), TARGETS["neighbour_ratio"])
    if result.get("llama_cpp_neighbour_ratio") is not None:
        lines.append(f"llama.cpp beside one busy core / quiet: {result['llama_cpp_neighbour_ratio']:.2f} (no target)")
    switch = result.get("switch_cost_steps", {})
    line("deepening after 16 tokens (deep steps)", switch.get("16"), TARGETS["switch_cost_16"], at_most=True)
    line(
        "decode step, 2000 / 64 tokens of context",
        result.get("context_step_ratio", {}).get("2000"),
        TARGETS["context_2000"],
        at_most=True,
    )
    line(
        "memory, all exits / full alone",
        result.get("memory_ratio_all_vs_full"),
        TARGETS["memory_ratio_all_vs_full"],
        at_most=True,
    )
    return lines


def plot_bench(result: dict, path: str) -> None:
    """Left: decode tokens/s per exit beside its floor; right: perplexity against tokens/s (when known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["exits"]
    labels = ["full" if r["full"] else str(r["exit"]) for r in rows]
    fig, (ax_speed, ax_quality) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(rows))
    ax_speed.bar([x - 0.2 for x in xs], [r["decode_tok_s"] for r in rows], width=0.4, label="exit (engine)")
    ax_speed.bar(
        [x + 0.2 for x in xs],
        [r["floor_tok_s"] or 0 for r in rows],
        width=0.4,
        label="floor (truncated base, bare loop)",
    )
    torch_speed = result.get("peers", {}).get("torch", {}).get("decode_tok_s")
    if torch_speed:
        ax_speed.axhline(torch_speed, color="grey", linestyle="--", label="torch generate (full)")
    llama_speed = result.get("peers", {}).get("llama_cpp", {}).get("decode_tok_s")
    if llama_speed:
        ax_speed.axhline(
            llama_speed, color="tab:red", linestyle=":", label=f"llama.cpp {result.get('llama_cpp_precision')} (full)"
        )
    same_exit = [(x, r["llama_cpp_same_exit_tok_s"]) for x, r in zip(xs, rows) if r.get("llama_cpp_same_exit_tok_s")]
    if same_exit:
        ax_speed.plot(*zip(*same_exit), "rv", label="llama.cpp on the same exit's GGUF")
    genai = [(x, r["genai_tok_s"]) for x, r in zip(xs, rows) if r.get("genai_tok_s")]
    if genai:
        ax_speed.plot(*zip(*genai), "g^", label="onnxruntime-genai on the exit's graph")
    ax_speed.set_xticks(list(xs), labels)
    ax_speed.set_xlabel("exit")
    ax_speed.set_ylabel("decode tokens/s (batch 1)")
    ax_speed.legend()
    with_ppl = [r for r in rows if r["ppl"] is not None]
    if with_ppl:
        ax_quality.plot([r["decode_tok_s"] for r in with_ppl], [r["ppl"] for r in with_ppl], "o-")
        for r in with_ppl:
            ax_quality.annotate("full" if r["full"] else f"exit {r['exit']}", (r["decode_tok_s"], r["ppl"]))
        ax_quality.set_yscale("log")
        ax_quality.set_ylabel("held-out perplexity")
    else:
        ax_quality.plot([r["decode_tok_s"] for r in rows], [r["bandwidth_gb_s"] for r in rows], "o-")
        ax_quality.set_ylabel("achieved weight bandwidth (GB/s)")
        ax_quality.set_title("no perplexities given (--eval or --checkpoint)", fontsize="medium")
    ax_quality.set_xlabel("decode tokens/s")
    for ax in (ax_speed, ax_quality):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['precision']} on {result['provider']}, threads {result['threads'] or 'default'}")
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # room for the title above the axes' labels
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=120)
    plt.close(fig)
