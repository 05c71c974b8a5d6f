"""The interactive chat: streaming answers with each token's exit visible, a status line, and slash commands."""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console

from balcony_edge.common.console import console as status_console
from balcony_edge.common.console import labelled
from balcony_edge.common.errors import BalconyError
from balcony_edge.runtime.core.engine import Engine, GeneratedToken
from balcony_edge.runtime.core.sampling import SamplingConfig
from balcony_edge.runtime.core.sequence import ContextFullError
from balcony_edge.runtime.core.text import check_prompt_text
from balcony_edge.runtime.device.controller import Budget, ControllerConfig
from balcony_edge.runtime.device.hub import SignalHub
from balcony_edge.runtime.device.telemetry import TelemetryWriter

EXIT_COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")
HELP = (
    "commands: /exit N (pin an exit), /budget X (auto, full, eco, "
    "16, 40ms), /system TEXT, /stats, /reset, /quit, /help; "
    'end a line with \\ to go on, or put """ alone on a line to '
    "start and end a multi-line message; Ctrl-C stops an answer"
)
BANNER = "type a message, /help for commands; Ctrl-C stops an answer, /quit or Ctrl-D ends"
CONTINUE, BLOCK = "\\", '"""'
HISTORY_FILE = "chat_history"


@dataclass
class ChatStats:
    """Counts over the session: tokens and latency per exit (ms), catch-up positions."""

    tokens: Counter = field(default_factory=Counter)
    latency_ms: dict = field(default_factory=lambda: defaultdict(float))
    catch_up_tokens: int = 0

    def add(self, token: GeneratedToken) -> None:
        self.tokens[token.exit] += 1
        self.latency_ms[token.exit] += token.latency_ms
        self.catch_up_tokens += token.catch_up_tokens

    def lines(self) -> list[str]:
        rows = [
            f"exit {exit:>3}: {count:>5} tokens, mean {self.latency_ms[exit] / count:6.1f} ms/token"
            for exit, count in sorted(self.tokens.items())
        ]
        return rows + [f"catch-up positions recomputed: {self.catch_up_tokens}"]


class ChatSession:
    """One conversation with an engine: message history, its sequence (KV cache) and the current budget."""

    def __init__(
        self,
        engine: Engine,
        budget: Budget | str,
        sampling: SamplingConfig | None,
        signals: SignalHub,
        telemetry: TelemetryWriter | None = None,
        max_new_tokens: int = 256,
        plain: bool = False,
        console: Console | None = None,
        sliding_window: bool = False,
        system: str | None = None,
        controller_config: ControllerConfig | None = None,
        status: Console | None = None,
    ):
        """sampling None: the export's recommended settings. The answer goes to `console` (stdout), status lines and
        notices to `status` (stderr), so that a script reading stdout gets the answer alone."""
        self.engine, self.signals, self.telemetry = engine, signals, telemetry
        self.sampling = sampling if sampling is not None else engine.default_sampling
        self.controller_config = controller_config
        self.budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
        self.max_new_tokens, self.plain, self.sliding_window, self.system = (
            max_new_tokens,
            plain,
            sliding_window,
            system,
        )
        self.console = console or Console(highlight=False)
        self.status = status or status_console  # stderr; --quiet silences it
        self.turns = 0  # answers given: each labels its telemetry records
        self._told_below_floor = False
        self.colours = {exit: EXIT_COLOURS[i % len(EXIT_COLOURS)] for i, exit in enumerate(engine.exits[:-1])}
        self.colours[engine.exits[-1]] = "default"
        self.stats = ChatStats()
        self.reset()
        self.show_floor()

    def show_floor(self) -> None:
        """Where the budget may step down to, when a quality floor stops it above the shallowest exit."""
        if not self.budget.is_fixed:
            # profiles: measured once per device and export, then cached; not part of an answer's tok/s
            controller = self.engine.controller(self.budget, self.controller_config)
            if controller.floor_exit is not None:
                self.status.print(f"[dim]{controller.floor_note}[/dim]", soft_wrap=True)

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.sequence = self.engine.sequence(sliding_window=self.sliding_window)

    def command(self, line: str) -> bool:
        """Handle a /command; returns False when the chat should end."""
        name, _, argument = line[1:].partition(" ")
        argument = argument.strip()
        try:
            if name in ("quit", "q"):
                return False
            if name in ("exit", "budget") and argument:  # /exit N is the budget N
                self.budget = Budget.parse(argument)
                self.engine.controller(self.budget, self.controller_config)  # refuse an exit the export lacks now
                self.show_floor()
            elif name == "stats":
                for row in self.stats.lines() + [f"provider: {self.engine.describe(verbose=True)}"]:
                    self.console.print(f"[dim]{row}[/dim]")
                return True
            elif name == "system":
                if argument:
                    check_prompt_text(argument)
                    self.system = argument
                    self.reset()
                    self.console.print("[dim]system message set; conversation cleared[/dim]")
                else:
                    self.console.print(f"[dim]system message: {self.system or '(none)'}[/dim]")
                return True
            elif name == "reset":
                self.reset()
                self.console.print("[dim]conversation cleared[/dim]")
                return True
            else:
                self.console.print(f"[dim]{HELP}[/dim]")
                return True
            self.console.print(f"[dim]budget: {self.budget}[/dim]")
        except BalconyError as err:
            self.show_error(err)
        return True

    def show_error(self, err: BalconyError) -> None:
        """One red line; the chat goes on."""
        self.console.print(labelled("error: ", "red", str(err)), soft_wrap=True)

    def answer(self, text: str) -> list[GeneratedToken]:
        """Stream the answer to one user message; Ctrl-C stops it and keeps what was said.

        A message that cannot be answered (bad text, no room in the context) raises before anything changes."""
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = self.engine.codec.chat_prompt(messages)
        sequence = self.sequence
        if ids[: len(sequence.tokens)] == sequence.tokens:
            new_ids = ids[len(sequence.tokens) :]
        else:  # the template rendered earlier turns differently, or the window slid: start the cache over
            sequence, new_ids = self.engine.sequence(sliding_window=self.sliding_window), ids
        tokens: list[GeneratedToken] = []
        started, shown_exit = time.perf_counter(), None
        try:
            generation = self.engine.generate(
                new_ids,
                self.max_new_tokens,
                self.budget,
                self.sampling,
                self.signals,
                self.controller_config,
                sequence=sequence,
            )
            self.turns += 1
            if self.telemetry is not None:
                generation = self.telemetry.follow(generation, turn=self.turns, budget=str(self.budget))
            for token in generation:
                tokens.append(token)
                self.stats.add(token)
                self.tell_below_floor(token)
                if self.plain:
                    marker = f"[{token.exit}]" if token.exit != shown_exit else ""
                    self.console.print(marker + token.text, end="", markup=False, soft_wrap=True)
                else:
                    self.console.print(
                        token.text, end="", style=self.colours.get(token.exit), markup=False, soft_wrap=True
                    )
                shown_exit = token.exit
        except KeyboardInterrupt:
            self.console.print(" [dim](stopped)[/dim]", end="")
        except ContextFullError:
            if not tokens:  # the message itself did not fit: nothing was said
                raise
            self.console.print(" [dim](context full: /reset starts a new conversation)[/dim]", end="")
        self.console.print()
        reply = self.engine.codec.decode([t.id for t in tokens])
        self.sequence, self.messages = sequence, [*messages, {"role": "assistant", "content": reply}]
        self.status.print(self.status_line(tokens, time.perf_counter() - started), style="dim")
        return tokens

    def tell_below_floor(self, token: GeneratedToken) -> None:
        """Say once per session that a hard limit took the answer below the quality floor."""
        if token.below_floor and not self._told_below_floor:
            self._told_below_floor = True
            self.status.print(
                f"[yellow]exit {token.exit} is below the quality floor ({token.why}): answers may degrade[/yellow]"
            )

    def status_line(self, tokens: list[GeneratedToken], seconds: float) -> str:
        """tok/s, the last exit, temperature, battery and power of the last answer."""
        signals = tokens[-1].signals if tokens else {}
        parts = [
            f"{len(tokens) / seconds:.1f} tok/s" if seconds > 0 else "",
            (f"exit {tokens[-1].exit}" + (f": {tokens[-1].why}" if tokens[-1].why else "")) if tokens else "",
        ]
        if "temperature_degc" in signals:
            parts.append(f"{signals['temperature_degc']:.0f} degC")
        if "battery_percent" in signals:
            parts.append(
                f"battery {signals['battery_percent']:.0f}%" + (" (on battery)" if signals.get("on_battery") else "")
            )
        if "power_mw" in signals:
            parts.append(f"{signals['power_mw'] / 1000:.1f} W")
        parts.append(f"budget {self.budget}")
        return " | ".join(p for p in parts if p)

    def run(self, read_line: Callable[[str], str] = input) -> None:
        """The interactive loop: read a message, answer it or run its command, until /quit or end of input."""
        self.status.print(f"[dim]balcony-edge chat on {self.engine.describe()}\n{BANNER}[/dim]")
        history = None
        if read_line is input:
            if hasattr(sys.stdin, "reconfigure"):
                sys.stdin.reconfigure(
                    errors="surrogateescape"
                )  # bytes that are not UTF-8 reach the prompt check, which names them
            history = line_editing()
        try:
            self._loop(read_line)
        finally:
            if history is not None:
                history()

    def _loop(self, read_line: Callable[[str], str]) -> None:
        while True:
            try:
                line = read_message(read_line)
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            try:
                self.answer(line)
            except BalconyError as err:  # this message cannot be answered; the conversation goes on
                self.show_error(err)


def read_message(read_line: Callable[[str], str]) -> str:
    """One message: a line; lines ending in a backslash go on; a line of three double quotes opens a block that the
    next such line closes."""
    first = read_line("> ")
    if first.strip() == BLOCK:
        lines = []
        while (line := read_line("... ")).strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines).strip()
    lines = [first]
    while lines[-1].endswith(CONTINUE):
        lines[-1] = lines[-1][: -len(CONTINUE)]
        lines.append(read_line("... "))
    return "\n".join(lines).strip()


def line_editing() -> Callable[[], None] | None:
    """Line editing and a history kept across sessions (readline, where Python has it); returns what saves it."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input still works
        return None
    from balcony_edge.common.paths import cache_dir

    path = cache_dir() / HISTORY_FILE
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)

    def save() -> None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)

    return save
