"""Where the library tells a person what a long step is doing: stderr, through rich."""

from rich.console import Console

console = Console(stderr=True, highlight=False)


def say(message: str) -> None:
    """Print one status line on stderr."""
    console.print(f"[dim]balcony-edge:[/dim] {message}")
