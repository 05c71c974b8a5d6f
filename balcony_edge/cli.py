"""The `balcony-edge` command: a thin typer layer over the library; a BalconyError becomes one red line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

try:  # typer 0.26 and later carry their own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # the same classes from click itself (mypy sees two distinct types)
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # type: ignore[assignment]

from balcony_edge.common.console import console, labelled
from balcony_edge.common.errors import BalconyError, TrainingStopped
from balcony_edge.common.paths import check_output_folder, check_writable_folder

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train, evaluate, export and run Balcony exits of a decoder language model.",
)


def _show_version(value: bool) -> None:
    if value:
        from balcony_edge import __version__

        print(f"balcony-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars or status lines on stderr (errors still show).")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also show the library's informational log lines.")
    ] = False,
) -> None:
    """Train, evaluate, export and run Balcony exits of a decoder language model."""
    import logging

    from rich.logging import RichHandler

    console.quiet = quiet
    if not verbose:  # our own rich bars show each phase; Hugging Face's per-file tqdm bars only add noise
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logger = logging.getLogger("balcony_edge")
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if not any(isinstance(handler, RichHandler) for handler in logger.handlers):
        logger.addHandler(RichHandler(console=console, show_time=False, show_path=False))


CheckpointArg = Annotated[
    Optional[Path],
    typer.Argument(help="Checkpoint folder written by `train`; default: the shipped SmolLM2 checkpoint."),
]
BaseOpt = Annotated[
    Optional[str],
    typer.Option(help="Base model: `smollm2`, a Hugging Face folder or a .gguf file (default: the checkpoint's)."),
]


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints are written (atomically) here.")],
    exits: Annotated[str, typer.Option(help="Exit depths, comma-separated.")] = "8,16,24",
    base: Annotated[
        str, typer.Option(help="Base model: `smollm2`, a Hugging Face folder or a .gguf file.")
    ] = "smollm2",
    data: Annotated[
        Optional[list[str]],
        typer.Option(
            help="Text, JSONL (.xz or .gz too) or parquet files or folders (repeatable); "
            "PATH:WEIGHT mixes sources by weight (`bbc-news`: default corpus).",
        ),
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per packed sequence.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Sequences per optimizer step, over all ranks.")] = 16,
    micro_batch_size: Annotated[
        int, typer.Option(help="Sequences per forward pass on one rank (accumulation fills the batch).")
    ] = 4,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warmup + cosine).")] = 2e-3,
    epochs: Annotated[
        Optional[float], typer.Option(help="Passes over the data (default 1); or give --max-tokens.")
    ] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Training tokens for the whole schedule.")] = None,
    max_minutes: Annotated[
        Optional[float], typer.Option(help="Stop this invocation after so many minutes (continue with --resume).")
    ] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every so many steps.")] = 100,
    seed: Annotated[int, typer.Option()] = 0,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on a GPU), bf16 or fp32.")] = "auto",
    balcony_init: Annotated[str, typer.Option(help="last (copy of the last backbone layer) or random.")] = "last",
    norm_init: Annotated[
        str, typer.Option(help="final (copy of the final norm) or exit_input (the exit layer's input norm).")
    ] = "final",
    balcony_layers: Annotated[
        str,
        typer.Option(
            help="EXIT:LAYERS for balconies of more than one decoder layer (up to 4), such as 8:2; eval and "
            "export --format hf|gguf take them, the ONNX export takes one-layer balconies."
        ),
    ] = "",
    save_dtype: Annotated[str, typer.Option(help="dtype of the saved balconies: fp32, fp16 or bf16.")] = "fp32",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch.")] = None,
    distill_top_k: Annotated[
        int, typer.Option(help="KL over the union of the teacher's top-k tokens (0: whole vocabulary).")
    ] = 32,
    init_from: Annotated[
        Optional[Path],
        typer.Option(
            help="Start from this checkpoint's balconies (same base; it may hold more exits, or shallower "
            "balconies), with a new schedule."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out exactly where its last checkpoint stopped.")
    ] = False,
    force: Annotated[
        bool, typer.Option(help="Replace a checkpoint already in --out (never a folder of other files).")
    ] = False,
    on_policy: Annotated[
        int,
        typer.Option(
            help="Answers each exit writes to chat prompts per step (0 to 256), "
            "trained on where the full model scores them (0: off)."
        ),
    ] = 0,
    answer_tokens: Annotated[int, typer.Option(help="The longest on-policy answer (tokens, up to 4096).")] = 128,
    answer_temperature: Annotated[float, typer.Option(help="Sampling temperature of the on-policy answers.")] = 1.0,
    divergence: Annotated[
        str, typer.Option(help="forward (KL(full || exit)), reverse (KL(exit || full)) or jsd.")
    ] = "forward",
    on_policy_weight: Annotated[
        float, typer.Option(help="Weight of the on-policy loss beside the teacher-forced one.")
    ] = 1.0,
) -> None:
    """Train balconies by self-distillation from the frozen full model (on text, and with --on-policy on their own
    answers)."""
    from balcony_edge.exits import parse_exits
    from balcony_edge.train import TrainConfig
    from balcony_edge.train import train as run_training

    config = TrainConfig(
        exits=parse_exits(exits, None),
        out=str(out),
        base=base,
        data=list(data or []),
        seq_len=seq_len,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        lr=lr,
        epochs=epochs,
        max_tokens=max_tokens,
        max_minutes=max_minutes,
        save_every=save_every,
        seed=seed,
        precision=precision,
        balcony_init=balcony_init,
        norm_init=norm_init,
        balcony_layers=balcony_layers,
        save_dtype=save_dtype,
        threads=threads,
        distill_top_k=distill_top_k,
        init_from=str(init_from) if init_from is not None else None,
        on_policy=on_policy,
        answer_tokens=answer_tokens,
        answer_temperature=answer_temperature,
        divergence=divergence,
        on_policy_weight=on_policy_weight,
    )
    summary = run_training(config, resume=resume, force=force)
    console.print(
        f"saved {out}: {summary['steps']}/{summary['total_steps']} steps, "
        f"{summary['tokens_seen']:,} tokens, {summary['wall_seconds']:.0f} s"
    )


@app.command("chat-data")
def chat_data(
    out: Annotated[Path, typer.Option(help="JSONL file to write (whole, at the end).")],
    base: Annotated[
        str, typer.Option(help="Teacher: `smollm2`, a Hugging Face folder or a .gguf file of a chat model.")
    ] = "smollm2",
    prompts: Annotated[
        int, typer.Option(min=1, help="Prompts to answer (topics x kinds of request, drawn without repeats).")
    ] = 1000,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 0.9,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts answered together.")] = 64,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    max_minutes: Annotated[
        Optional[float], typer.Option(help="Stop after the batch that crosses so many minutes.")
    ] = None,
    exclude: Annotated[
        Optional[Path],
        typer.Option(
            help="A chat corpus (JSONL) whose prompts are not drawn again (its held-out answers stay unseen)."
        ),
    ] = None,
) -> None:
    """Write a chat corpus of the teacher's own answers to varied prompts (a second training corpus beside news)."""
    from balcony_edge.chat_corpus import ChatCorpusConfig, write_chat_corpus

    config = ChatCorpusConfig(
        base=base,
        prompts=prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
        exclude=str(exclude) if exclude is not None else None,
    )
    written = write_chat_corpus(config, out, max_minutes)
    console.print(f"wrote {out}: {written} answers")


@app.command("free-text")
def free_text(
    out: Annotated[Path, typer.Option(help="JSONL file to write (whole, at the end).")],
    base: Annotated[str, typer.Option(help="Teacher: `smollm2`, a Hugging Face folder or a .gguf file.")] = "smollm2",
    samples: Annotated[int, typer.Option(min=1, help="Texts to sample.")] = 1000,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest text, in tokens.")] = 512,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (1: the model's own distribution).")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 0.95,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts sampled together.")] = 64,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    start: Annotated[
        Optional[str], typer.Option(help="Text every sample starts from; default: <|endoftext|>, else the BOS token.")
    ] = None,
    max_minutes: Annotated[
        Optional[float], typer.Option(help="Stop after the batch that crosses so many minutes.")
    ] = None,
) -> None:
    """Write a free-text corpus: what the teacher writes from a bare document start (the kinds of text it knows)."""
    from balcony_edge.free_text import FreeTextConfig, write_free_text

    config = FreeTextConfig(
        base=base,
        samples=samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
        start=start,
    )
    written = write_free_text(config, out, max_minutes)
    console.print(f"wrote {out}: {written} texts")


@app.command("eval")
def evaluate_command(
    checkpoint: CheckpointArg = None,
    base: BaseOpt = None,
    data: Annotated[
        Optional[list[str]],
        typer.Option(
            help="Evaluation text (all of it, or its held-out part with "
            "--held-out); default: the held-out 5% of the default corpus.",
        ),
    ] = None,
    held_out: Annotated[bool, typer.Option(help="Evaluate only the 5% of --data that training holds out.")] = False,
    max_tokens: Annotated[int, typer.Option(min=0, help="Evaluate at most so many tokens (0: all).")] = 32768,
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per evaluated sequence.")] = 512,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Write a plot of quality against compute (PNG) here.")] = None,
    chat: Annotated[
        bool,
        typer.Option(
            help="Also answer the held-out chat prompts at every depth "
            "and judge the answers by the full model (minutes)."
        ),
    ] = False,
    export: Annotated[
        Optional[Path],
        typer.Option(
            help="With --chat: the answers are written by this export's "
            "ONNX runtime (e.g. an int4 one), judged in torch."
        ),
    ] = None,
    seeds: Annotated[
        int,
        typer.Option(
            min=0, help="With --chat: sampled answers per prompt at the model's own settings, beside the greedy ones."
        ),
    ] = 3,
    answer_tokens: Annotated[int, typer.Option(min=1, help="With --chat: the longest answer (tokens).")] = 96,
    record: Annotated[
        bool,
        typer.Option(
            help="With --chat: keep the greedy figures in the checkpoint (or --export's manifest): "
            "what export carries and the quality floor reads."
        ),
    ] = False,
) -> None:
    """Perplexity, top-1 agreement and KL per exit, beside the naive early exit and the full model; with --chat, what
    users read: each exit's answers judged by the full model."""
    from balcony_edge.checkpoint import load_checkpoint
    from balcony_edge.data import load_corpus, pack, read_documents
    from balcony_edge.evaluate import evaluate, plot_quality

    check_output_folder(plot, "--plot")
    if (export is not None or record) and not chat:
        raise BalconyError("--export and --record go with --chat (the held-out answers); add --chat")
    model, info, loaded = load_checkpoint(checkpoint, base)
    engine = _eval_engine(export, info, model.exits) if export is not None else None
    if record:
        from balcony_edge.checkpoint import SHIPPED_CHECKPOINT

        check_writable_folder(export or checkpoint or SHIPPED_CHECKPOINT, "--record")
    documents = load_corpus(data).held_out if held_out or not data else read_documents(data)
    blocks = pack(documents, loaded.tokenizer, seq_len, what="evaluation")
    if max_tokens:
        blocks = blocks[: max(1, max_tokens // seq_len)]
    result = evaluate(model, blocks, show_progress=not as_json)
    answers = None
    if chat:
        from balcony_edge.answer_quality import AnswerSettings, ExportWriter, answer_quality
        from balcony_edge.base_model import recommended_sampling

        settings = AnswerSettings(answer_tokens, recommended_sampling(loaded)[0], seeds)
        writer = ExportWriter(engine) if engine is not None else None
        answers = answer_quality(model, loaded.tokenizer, settings, show_progress=not as_json, writer=writer)
    if plot:
        plot_quality(result, str(plot), answers)
    _show_eval(result, answers, info, model.num_layers, export, as_json)
    if record and answers:  # after the figures are shown: a failing write loses none of them
        _record_answers(answers.record(), export, checkpoint)


def _show_eval(result, answers, info, num_layers: int, export: Optional[Path], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_json() | ({"chat": answers.to_json()} if answers else {}), indent=2))
        return
    from rich.table import Table

    table = Table(title=f"held-out quality, {result.tokens:,} tokens ({info.base['name']})")
    for column in ("exit", "compute", "ppl", "x full", "top-1", "KL", "naive ppl", "naive top-1"):
        table.add_column(column, justify="right")
    for e in result.exits:
        table.add_row(
            str(e.exit),
            f"{e.relative_compute:.2f}",
            f"{e.ppl:.2f}",
            f"{e.ppl / result.full_ppl:.2f}",
            f"{e.top1_agreement:.3f}",
            f"{e.kl:.3f}",
            f"{e.naive_ppl:.1f}",
            f"{e.naive_top1_agreement:.3f}",
        )
    table.add_row("full", "1.00", f"{result.full_ppl:.2f}", "1.00", "1.000", "0", "", "")
    console.print(table)
    if answers:
        console.print(_answers_table(answers, num_layers, export))


def _record_answers(figures: dict, export: Optional[Path], checkpoint: Optional[Path]) -> None:
    if export is not None:
        from balcony_edge.export.exporter import record_export_answers

        record_export_answers(export, figures)
        return
    from balcony_edge.checkpoint import SHIPPED_CHECKPOINT, record_answers

    record_answers(checkpoint or SHIPPED_CHECKPOINT, figures)


def _eval_engine(export: Path, info, exits: tuple[int, ...]):
    """The engine whose answers `eval --chat --export` judges: an export of this checkpoint's base model and exits."""
    from balcony_edge.runtime.core.engine import Engine

    engine = Engine.load(export)
    if engine.manifest.base.get("sha256") != info.base["sha256"]:
        raise BalconyError(
            f"--export {export} was made from another base model than "
            "the checkpoint's; give an export of this checkpoint"
        )
    foreign = [k for k in engine.exits[:-1] if k not in exits]
    if foreign:
        raise BalconyError(
            f"--export {export} has exit {foreign[0]}, which the checkpoint (exits {','.join(map(str, exits))}) "
            "has not; give an export of this checkpoint"
        )
    deeper = [k for k in engine.exits[:-1] if info.config.layers_at(k) > 1]
    if deeper:  # an ONNX export holds one-layer balconies: it was made from another checkpoint
        raise BalconyError(
            f"--export {export} has exit {deeper[0]}, whose balcony in the checkpoint has "
            f"{info.config.layers_at(deeper[0])} layers; give an export of this checkpoint, or leave out --export"
        )
    return engine


def _answers_table(answers, num_layers: int, export: Optional[Path]):
    from rich.table import Table

    s = answers.settings
    source = f"written by {export}" if export else "written in torch"
    knobs = ", ".join(f"{name} {value:g}" for name, value in s.sampling.items())
    sampled = f"; sampled at the model's settings ({knobs}), {s.seeds} seeds" if s.sampled_seeds else ""
    table = Table(
        title=f"held-out chat answers, {answers.prompts} prompts, up to {s.max_new_tokens} "
        f"tokens, {source}, judged by the full model (greedy{sampled})"
    )
    columns = ["depth", "judge NLL", "loops", "length", "facts right", "reverse NLL"]
    if s.sampled_seeds:
        columns[2:2] = ["sampled judge NLL"]
        columns += ["sampled loops", "sampled facts"]
    for column in columns:
        table.add_column(column, justify="right")
    for d in answers.depths:
        row = [
            "full" if d.depth == num_layers else str(d.depth),
            f"{d.judge_nll:.2f}",
            f"{d.loop_share:.0%}",
            f"{d.mean_length:.0f}",
            f"{d.facts_right:.0%}",
            f"{d.reverse_nll:.2f}",
        ]
        if s.sampled_seeds:
            row[2:2] = [f"{d.sampled_judge_nll:.2f}"]
            row += [f"{d.sampled_loop_share:.0%}", f"{d.sampled_facts_right:.0%}"]
        table.add_row(*row)
    return table


@app.command()
def generate(
    checkpoint: CheckpointArg = None,
    prompt: Annotated[str, typer.Option(help="The prompt.")] = "Tell me about the sea.",
    exit: Annotated[str, typer.Option("--exit", help="Exit depth, or `full`.")] = "full",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 64,
    raw: Annotated[bool, typer.Option(help="Feed the prompt as plain text, without the chat template.")] = False,
    base: BaseOpt = None,
) -> None:
    """Greedy generation at one exit in torch (the reference the ONNX runtime is checked against)."""
    from balcony_edge.checkpoint import load_checkpoint
    from balcony_edge.common.errors import ExitsError
    from balcony_edge.generate import eos_token_ids, generate_greedy, prompt_ids
    from balcony_edge.runtime.core.text import check_prompt_text

    check_prompt_text(prompt)
    model, _, loaded = load_checkpoint(checkpoint, base)
    if exit == "full":
        depth = model.num_layers
    else:
        try:
            depth = int(exit)
        except ValueError:
            raise ExitsError(
                f"--exit {exit!r} is not an integer; give a trained exit ({', '.join(map(str, model.exits))}) or `full`"
            ) from None
    ids = prompt_ids(loaded.tokenizer, prompt, chat=not raw)
    new = generate_greedy(model, depth, ids, max_new_tokens, eos_token_ids(model, loaded.tokenizer))
    print(loaded.tokenizer.decode(new, skip_special_tokens=True))


@app.command()
def export(
    checkpoint: CheckpointArg = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            help="Export folder; default: a folder under <cache>/exports named after the checkpoint and precision.",
        ),
    ] = None,
    exits: Annotated[
        Optional[str],
        typer.Option(help="Trained exits to export, comma-separated; default: all. The full model always is (onnx)."),
    ] = None,
    format: Annotated[
        str,
        typer.Option(
            help="onnx (the runtime's folder), hf (a transformers folder per exit) or gguf (a llama.cpp file per exit)."
        ),
    ] = "onnx",
    dtype: Annotated[
        Optional[str],
        typer.Option(help="onnx: fp32 or fp16 (GPUs); hf: fp32, fp16 or bf16; gguf: f16 (default), fp32 or q8_0."),
    ] = None,
    quantize: Annotated[
        Optional[str], typer.Option(help="onnx: weight-only int8 or int4 (onnxruntime MatMulNBits).")
    ] = None,
    base: BaseOpt = None,
    force: Annotated[bool, typer.Option(help="Replace an existing export folder.")] = False,
    verify: Annotated[
        bool, typer.Option(help="onnx: check every graph in onnxruntime against the torch model.")
    ] = True,
    kv_cache: Annotated[
        str,
        typer.Option(
            help="onnx: float (the activations' type) or int8 (a quarter of fp32's cache; calibrated scales)."
        ),
    ] = "float",
    block_size: Annotated[
        int,
        typer.Option(
            help="onnx, with --quantize: weights per quantisation block, 16, 32, 64 or 128 "
            "(64: faster, less like fp32; docs/export.md)."
        ),
    ] = 32,
) -> None:
    """Export each exit: ONNX graphs sharing one weights file (with the full model and a manifest), or one Hugging
    Face folder or GGUF file per exit."""
    if format != "onnx":
        if quantize is not None:
            raise BalconyError(f"--quantize applies to --format onnx; for --format {format} choose a --dtype")
        if kv_cache != "float":
            raise BalconyError(
                "--kv-cache applies to --format onnx; leave it out for "
                f"--format {format} (its runtime chooses its own cache type)"
            )
        if block_size != 32:
            raise BalconyError(
                f"--block-size applies to --format onnx with --quantize; leave it out for --format {format}"
            )
        _export_exit_checkpoints(checkpoint, out, exits, format, dtype, base, force)
        return
    from balcony_edge.export.exporter import ExportConfig, export_checkpoint
    from balcony_edge.export.inspect import exits_table
    from balcony_edge.runtime.core.manifest import REPORT_FILE, Manifest

    config = ExportConfig(
        checkpoint=checkpoint,
        out=out,
        exits=exits,
        dtype=dtype or "fp32",
        quantize=quantize,
        base=base,
        force=force,
        verify=verify,
        kv_cache=kv_cache,
        block_size=block_size,
    )
    folder = export_checkpoint(config)
    report = json.loads((folder / REPORT_FILE).read_text())
    console.print(exits_table(folder, Manifest.load(folder), report))
    verified = f"verified in {report['verify_seconds']:.0f} s" if report["verification"] else "not verified"
    console.print(
        f"exported {folder}: weights {report['weights_file_bytes'] / 1e6:.1f} MB "
        f"(parameters {report['parameter_bytes'] / 1e6:.1f} MB); graphs in {report['export_seconds']:.0f} s, {verified}"
    )


def _export_exit_checkpoints(checkpoint, out, exits, format, dtype, base, force) -> None:
    from balcony_edge.export.exit_checkpoints import ExitCheckpointConfig, export_exit_checkpoints

    config = ExitCheckpointConfig(
        format=format, checkpoint=checkpoint, out=out, exits=exits, dtype=dtype, base=base, force=force
    )
    folder, names = export_exit_checkpoints(config)
    console.print(f"exported {folder} ({format}, {config.file_dtype}): {', '.join(names)}")


@app.command()
def inspect(
    folder: Annotated[Path, typer.Argument(help="Export folder written by `balcony-edge export`.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (stdout) instead of the tables.")
    ] = False,
) -> None:
    """Exits, files, sizes, usable onnxruntime providers and checksums of an export folder."""
    from balcony_edge.common.errors import ManifestError
    from balcony_edge.export.inspect import exits_table, files_table, inspect_export

    inspection = inspect_export(folder)
    if as_json:
        print(json.dumps(inspection.to_json(), indent=2))
    else:
        console.print(exits_table(folder, inspection.manifest, inspection.report))
        console.print(files_table(inspection))
        console.print(f"onnxruntime providers usable here: {', '.join(inspection.providers)}")
    if inspection.problems:
        name, why = next(iter(inspection.problems.items()))
        raise ManifestError(
            f"{len(inspection.problems)} file(s) of {folder} fail the export checks ({name}: {why}); export again"
        )
    console.print("[green]checks OK[/green]")


TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-modified",
        help="Load an export whose files differ from their manifest checksums (a warning names them).",
    ),
]


def _warner(topic: str):
    """A callable that prints one yellow `topic:` line per warning."""
    return lambda text: console.print(labelled(f"{topic}: ", "yellow", text), soft_wrap=True)


def _thread_pool_choice(value: str) -> str:
    """The --thread-pool value, checked when the command line is read (before any slow load)."""
    from balcony_edge.runtime.core.sessions import THREAD_POOLS

    if value not in THREAD_POOLS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(THREAD_POOLS)}")
    return value


ThreadPoolOpt = Annotated[
    str,
    typer.Option(
        envvar="BALCONY_EDGE_THREAD_POOL",
        show_envvar=False,  # docs/runtime.md names it; bench's narrow help column would cut the name
        callback=_thread_pool_choice,
        help="session: a pool per piece whose workers spin briefly (quick, and robust beside other busy work); "
        "process: onnxruntime's one pool for the process (spins without end).",
    ),
]
ExportArg = Annotated[
    Optional[Path],
    typer.Argument(
        help="Export folder; default: the default export, created from the shipped checkpoint on first use."
    ),
]


def _quality_floor(value: str) -> str | int:
    """--quality-floor: auto, off or an exit (checked against the export's exits when it loads)."""
    from balcony_edge.runtime.device.controller import parse_exit

    text = value.strip().lower()
    if text in ("auto", "off"):
        return text
    exit = parse_exit(text)
    if exit is not None:
        return exit
    raise typer.BadParameter(f"{value!r} is not auto, off or an exit such as 16")


QualityFloorOpt = Annotated[
    str,
    typer.Option(
        parser=_quality_floor,
        help="The shallowest exit auto, eco and latency budgets use: auto (the shallowest whose held-out answers loop "
        "no more than the full model's), off, or an exit.",
    ),
]


def _default_export() -> Path:
    """The default export folder, exported from the shipped checkpoint the first time, and again when the shipped
    checkpoint has changed since (needs the train extra; without it an older export is used, with a warning)."""
    from balcony_edge.common.paths import default_export_dir
    from balcony_edge.export.provenance import older_than_shipped

    folder = default_export_dir()
    exists = (folder / "manifest.json").is_file()
    if exists and not older_than_shipped(folder):
        return folder
    try:
        from balcony_edge.export.exporter import ExportConfig, export_checkpoint
    except ImportError:
        if exists:
            _warner("export")(
                f"{folder} holds older balconies than the shipped ones; run "
                "`balcony-edge export --force` where the train extra is installed"
            )
            return folder
        raise BalconyError(
            f"no default export at {folder}; create one with `balcony-edge "
            "export` where the train extra is installed, or give an export folder"
        ) from None
    why = "the shipped checkpoint changed since the default export was made" if exists else "first use"
    console.print(f"[dim]{why}: exporting the shipped checkpoint to {folder} (under a minute, once)[/dim]")
    return export_checkpoint(ExportConfig(checkpoint=None, out=folder, force=exists))


def _signal_hub(signals: Optional[str], clock: str):
    from balcony_edge.common.errors import SignalError
    from balcony_edge.runtime.device.hub import SignalHub, default_sources
    from balcony_edge.runtime.device.sources import FixedSource, TraceSource

    # A path that exists is a trace, whatever it is: TraceSource refuses one that is not a regular file.
    is_trace = signals is not None and (signals.endswith(".jsonl") or Path(signals).exists())
    if clock != "time" and not is_trace:
        raise SignalError(
            f"--signals-clock {clock} applies to a replayed trace; give --signals TRACE.jsonl or leave it out"
        )
    if signals is None:
        sources = default_sources()
    elif is_trace:
        sources = [TraceSource(signals, clock=clock)]
    else:
        sources = [FixedSource.from_text(signals)]
    return SignalHub(sources, on_warning=_warner("signals"))


@app.command()
def chat(
    export_folder: ExportArg = None,
    budget: Annotated[
        str, typer.Option(help="auto, full, eco, an exit such as 16, or a per-token latency target such as 40ms.")
    ] = "auto",
    prompt: Annotated[
        Optional[str], typer.Option(help="Answer this one prompt and exit (no interactive chat).")
    ] = None,
    signals: Annotated[
        Optional[str],
        typer.Option(
            help="A JSONL trace to replay, or fixed name=value readings, comma-separated, "
            "such as battery_percent=30; default: this device's sensors.",
        ),
    ] = None,
    signals_clock: Annotated[str, typer.Option(help="Replay a trace by `time` (t_s) or by `token`.")] = "time",
    telemetry: Annotated[Optional[Path], typer.Option(help="Write one JSON line per token here.")] = None,
    plain: Annotated[bool, typer.Option("--plain", help="Mark exit changes with [N] instead of colours.")] = False,
    system: Annotated[
        Optional[str], typer.Option(help="A system message that starts the conversation (also /system TEXT).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer at most.")] = 256,
    temperature: Annotated[
        Optional[float], typer.Option(help="0 for greedy; default: the export's (the model's own).")
    ] = None,
    top_k: Annotated[Optional[int], typer.Option(help="0: no limit; default: the export's.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Default: the export's.")] = None,
    min_p: Annotated[Optional[float], typer.Option(help="Default: the export's.")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(help="1: none; default: the export's.")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    quality_floor: QualityFloorOpt = "auto",
    provider: Annotated[
        Optional[list[str]], typer.Option(help="tensorrt, cuda or cpu, in order of preference (repeatable).")
    ] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads for onnxruntime.")] = None,
    sliding_window: Annotated[
        bool,
        typer.Option("--sliding-window", help="Past the context length, keep the newest half instead of stopping."),
    ] = False,
    thread_pool: ThreadPoolOpt = "session",
    trust_modified: TrustOpt = False,
) -> None:
    """Chat with the model, switching exits between tokens from the budget and the device's signals."""
    from balcony_edge.runtime import Engine, SamplingConfig
    from balcony_edge.runtime.chat import ChatSession
    from balcony_edge.runtime.core.text import check_prompt_text
    from balcony_edge.runtime.device.controller import Budget, ControllerConfig
    from balcony_edge.runtime.device.telemetry import TelemetryWriter

    # Everything the user typed is checked before the (slow) engine load or first-use export.
    overrides = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty
    )
    SamplingConfig.of({}, **overrides)
    controller_config = ControllerConfig(quality_floor=quality_floor)
    parsed_budget = Budget.parse(budget)
    for text in (prompt, system):
        if text is not None:
            check_prompt_text(text)
    with contextlib.ExitStack() as stack:  # the telemetry file and the signal sources are closed whatever happens
        writer = stack.enter_context(TelemetryWriter(telemetry, on_warning=_warner("telemetry"))) if telemetry else None
        hub = stack.enter_context(_signal_hub(signals, signals_clock))
        engine = Engine.load(
            export_folder or _default_export(),
            providers=provider,
            threads=threads,
            trust_modified=trust_modified,
            warn=_warner("export"),
            thread_pool=thread_pool,
        )
        sampling = SamplingConfig.of(engine.manifest.generation.sampling, **overrides, seed=seed)
        session = ChatSession(
            engine,
            parsed_budget,
            sampling,
            hub,
            writer,
            max_new_tokens,
            plain,
            sliding_window=sliding_window,
            system=system,
            controller_config=controller_config,
        )
        if prompt is not None:
            session.answer(prompt)
        else:
            session.run()


@app.command()
def serve(
    export_folder: ExportArg = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
    api_key: Annotated[
        Optional[str], typer.Option(help="Require Authorization: Bearer KEY on every path but /health.")
    ] = None,
    api_key_file: Annotated[
        Optional[Path], typer.Option(help="Read the key from this file (first line); keeps it out of `ps`.")
    ] = None,
    parallel: Annotated[int, typer.Option(min=1, help="Generations running at once (a token each in turn).")] = 1,
    queue: Annotated[
        int, typer.Option(min=0, help="Requests waiting beyond --parallel; more get 503 with Retry-After.")
    ] = 16,
    budget: Annotated[
        str,
        typer.Option(
            help="The device-wide budget: auto, full, eco, an exit or "
            "a latency such as 40ms; a request's `budget` caps it.",
        ),
    ] = "auto",
    model_name: Annotated[
        Optional[str], typer.Option(help="The model id clients send; default: the export folder's name.")
    ] = None,
    cors: Annotated[
        Optional[list[str]],
        typer.Option(help="Allow browser requests from this origin (repeatable; * for any). Off by default."),
    ] = None,
    signals: Annotated[
        Optional[str], typer.Option(help="A JSONL trace to replay, or fixed values; default: this device's sensors.")
    ] = None,
    provider: Annotated[
        Optional[list[str]], typer.Option(help="tensorrt, cuda or cpu, in order of preference (repeatable).")
    ] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads for onnxruntime.")] = None,
    thread_pool: ThreadPoolOpt = "session",
    trust_modified: TrustOpt = False,
    alias: Annotated[
        Optional[list[str]],
        typer.Option(help="Another model name to answer to (repeatable), for an app set up for one."),
    ] = None,
    quality_floor: QualityFloorOpt = "auto",
    prompt_cache: Annotated[
        int, typer.Option(min=0, help="Finished conversations kept for prompt reuse (0: none).")
    ] = 4,
) -> None:
    """An OpenAI-compatible HTTP server (chat/completions, completions, models, health, metrics) over the engine."""
    from balcony_edge.runtime.serving.launch import ServeOptions, run_server

    key = api_key
    if api_key_file is not None:
        if api_key is not None:
            raise BalconyError("--api-key and --api-key-file both given; give one")
        text = api_key_file.read_text(encoding="utf-8").strip()
        key = text.splitlines()[0].strip() if text else ""
    options = ServeOptions(
        export=export_folder,
        host=host,
        port=port,
        api_key=key,
        parallel=parallel,
        queue=queue,
        budget=budget,
        model_name=model_name,
        cors=tuple(cors or ()),
        providers=provider,
        threads=threads,
        thread_pool=thread_pool,
        trust_modified=trust_modified,
        aliases=tuple(alias or ()),
        quality_floor=quality_floor,
        prompt_cache=prompt_cache,
    )
    with _signal_hub(signals, "time") as hub:
        run_server(
            options,
            hub,
            default_export=_default_export,
            say=lambda text: console.print(f"[dim]{text}[/dim]"),
            warn=_warner("export"),
        )


@app.command()
def plot(
    telemetry: Annotated[Path, typer.Argument(help="A telemetry JSONL file written by `chat --telemetry`.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="PNG to write.")] = Path("telemetry.png"),
) -> None:
    """Plot exit, latency and signals over the tokens of a telemetry file."""
    from balcony_edge.runtime.device.telemetry import plot_telemetry, read_telemetry

    console.print(f"wrote {plot_telemetry(read_telemetry(telemetry), out)}")


@app.command()
def bench(
    export_folder: ExportArg = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole result as one JSON object (stdout) instead of the table.")
    ] = False,
    plot: Annotated[
        Optional[Path], typer.Option(help="Write a speed (and perplexity against speed) plot (PNG) here.")
    ] = None,
    new_tokens: Annotated[int, typer.Option(help="Greedy decode steps per run (tokens).")] = 128,
    prompt_tokens: Annotated[
        int, typer.Option(help="Prompt length for prefill and time to first token (tokens).")
    ] = 256,
    repeats: Annotated[
        int, typer.Option(help="Measured runs per figure, after one warm-up; medians are reported.")
    ] = 3,
    threads: Annotated[
        Optional[int], typer.Option(min=1, help="Intra-op threads for onnxruntime and torch; default: theirs.")
    ] = None,
    provider: Annotated[str, typer.Option(help="tensorrt, cuda or cpu.")] = "cpu",
    prepack: Annotated[
        bool,
        typer.Option("--prepack/--no-prepack", help="CPU weight prepacking (--no-prepack: to measure what it brings)."),
    ] = True,
    huge_pages: Annotated[
        bool,
        typer.Option(
            "--huge-pages/--no-huge-pages",
            help="Packed CPU weights on huge pages where Linux allows (--no-huge-pages: to measure what they bring).",
        ),
    ] = True,
    packed_weights: Annotated[
        bool,
        typer.Option(
            "--packed/--no-packed",
            help="CPU weights packed once on disk, one-session steps (--no-packed: to measure what it brings).",
        ),
    ] = True,
    thread_pool: ThreadPoolOpt = "session",
    floor: Annotated[
        bool,
        typer.Option(
            "--floor/--no-floor", help="Measure each exit's floor (a truncated base model; needs torch once)."
        ),
    ] = True,
    peers: Annotated[
        bool,
        typer.Option(
            "--peers/--no-peers", help="Measure torch generate, llama.cpp and onnxruntime-genai beside the engine."
        ),
    ] = True,
    memory: Annotated[
        bool, typer.Option("--memory/--no-memory", help="Measure memory of all exits against the full model alone.")
    ] = True,
    eval_file: Annotated[
        Optional[Path],
        typer.Option("--eval", help="`balcony-edge eval --json` output: perplexity per exit beside its speed."),
    ] = None,
    checkpoint: Annotated[
        Optional[Path],
        typer.Option(help="Checkpoint of the export, for a short perplexity eval in torch (without --eval)."),
    ] = None,
    trust_modified: TrustOpt = False,
) -> None:
    """Speed per exit against its floor, engine overhead, switching cost, memory and peers, in one run."""
    from balcony_edge.bench import BenchConfig, run_bench
    from balcony_edge.bench.report import exits_table, plot_bench, target_lines
    from balcony_edge.common.paths import default_export_dir

    def progress(text: str) -> None:
        console.print(f"[dim]{text}[/dim]")

    # The settings are checked (BenchConfig) before the default export is made on first use, which takes minutes.
    check_output_folder(plot, "--plot")
    config = BenchConfig(
        export=export_folder or default_export_dir(),
        new_tokens=new_tokens,
        prompt_tokens=prompt_tokens,
        repeats=repeats,
        threads=threads,
        provider=provider,
        prepack=prepack,
        huge_pages=huge_pages,
        packed_weights=packed_weights,
        thread_pool=thread_pool,
        floors=floor,
        peers=peers,
        memory=memory,
        eval_file=eval_file,
        checkpoint=checkpoint,
        trust_modified=trust_modified,
        say=progress,
    )
    if export_folder is None:
        _default_export()
    result = run_bench(config)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        console.print(exits_table(result))
        for line in target_lines(result):
            console.print(line)
        for note in result["notes"]:
            console.print(f"[yellow]note:[/yellow] {note}")
    if plot:
        plot_bench(result, str(plot))
        console.print(f"wrote {plot}")


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: every failure the user can fix is one red line and a non-zero exit."""
    try:
        code = app(args, prog_name="balcony-edge", standalone_mode=False)
    except TrainingStopped as err:
        _fail(str(err), 128 + err.signal_number)
    except BalconyError as err:
        _fail(str(err), 1)
    except NoArgsIsHelpError:  # `balcony-edge` alone: typer has printed the help
        sys.exit(2)
    except UsageError as err:
        _fail(_usage_line(err), err.exit_code)
    except ClickException as err:
        _fail(err.format_message(), err.exit_code)
    except OSError as err:  # a path the user gave that cannot be read or written
        where = f" ({err.filename})" if err.filename else ""
        _fail(f"{err.strerror or err}{where}; check the path, its permissions and the free disk space", 1)
    except (KeyboardInterrupt, typer.Abort):
        console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    console.quiet = False  # errors show even with --quiet
    console.print(labelled("error: ", "red", message), soft_wrap=True)
    sys.exit(code)


def _usage_line(err: UsageError) -> str:
    """A command-line mistake as one line: what is wrong (click suggests close names itself), and where help is."""
    path = err.ctx.command_path if err.ctx is not None else "balcony-edge"
    return f"{err.format_message().removesuffix('.')} (see `{path} --help`)"


if __name__ == "__main__":
    main()
