"""Where the library tells a person what a long step is doing: stderr, through rich."""

import logging

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

console = Console(stderr=True, highlight=False)


def say(message: str) -> None:
    """Print one status line on stderr."""
    console.print(f"[dim]balcony-edge:[/dim] {message}")


def labelled(label: str, colour: str, message: str) -> Text:
    """One line: a coloured label, then the message as plain text (never read as markup, newlines folded)."""
    return Text.assemble((label, colour), " ".join(message.splitlines()))


LOGGER = logging.getLogger("balcony_edge")  # the library's logger; silent (NullHandler) unless an app configures it


def log_warning(message: str) -> None:
    """The default of every on_warning / warn callable: a warning on the `balcony_edge` logger."""
    LOGGER.warning(message)


def phase_progress() -> Progress:
    """A progress bar for one long phase (export, verification, conversion): description, bar, done/total, time."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
