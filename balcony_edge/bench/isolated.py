"""Peers measured in child processes, with time limits: a peer that crashes (a native library's segfault, as
llama-cpp-python 0.3.36 does on Q4 files on AMX machines), hangs or fails to import becomes a note in the bench's
JSON, and the rest of the bench completes.

Two ways: `run_isolated` runs one measurement in a child and returns its JSON; `PeerWorker` keeps a peer's model
loaded in a child that times one greedy run per request, so that the bench can alternate it with the engine round by
round and the machine's drift between minutes falls on both.

    python -m balcony_edge.bench.isolated PEER < kwargs.json           # one measurement; prints one JSON line
    python -m balcony_edge.bench.isolated --worker PEER                # kwargs line, then {"count": N} lines
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import IO, cast

from balcony_edge.bench import peers

# Each measurement by name: a function of JSON-able keyword arguments that returns a JSON-able dict.
PEERS: dict[str, Callable[..., dict]] = {
    "torch": peers.torch_generate,
    "llama_cpp": peers.llama_cpp,
    "llama_cpp_neighbour": peers.llama_cpp_neighbour,
    "llama_cpp_convert": peers.gguf_at_precision_json,
    "llama_cpp_exit_files": peers.exit_gguf_files_json,
    "onnxruntime_genai": peers.onnxruntime_genai,
}
# Each peer a worker can hold: its timer factory (None when the peer is not installed) and what to say then.
TIMERS: dict[str, tuple[Callable[..., tuple[Callable[[int], float], dict] | None], dict]] = {
    "llama_cpp": (peers.llama_cpp_timer, peers.LLAMA_CPP_MISSING),
    "onnxruntime_genai": (peers.genai_timer, peers.GENAI_MISSING),
}
CHILD = [sys.executable, "-m", "balcony_edge.bench.isolated"]  # the child's command; the peer's name after it


def _failure(name: str, returncode: int | None, stderr: str) -> str:
    if returncode is not None and returncode < 0:
        return f"{name} crashed ({signal.Signals(-returncode).name}); the rest of the bench went on"
    last = (stderr.strip().splitlines() or ["no output"])[-1]
    return f"{name} failed ({last[:300]})"


def run_isolated(name: str, timeout_s: float, **kwargs) -> dict:
    """peers.<name>(**kwargs) in a fresh Python process; its result, or {"skipped": why} when it crashed, hung or
    failed."""
    try:
        done = subprocess.run(
            [*CHILD, name], input=json.dumps(kwargs), capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"{name} did not finish within {timeout_s:g} s and was stopped"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"skipped": _failure(name, done.returncode, done.stderr)}
    try:
        result = json.loads(lines[-1])
    except ValueError:
        return {"skipped": f"{name} printed no result ({lines[-1][:200]})"}
    return result if isinstance(result, dict) else {"skipped": f"{name} printed {lines[-1][:200]}"}


class PeerFailed(Exception):
    """A worker's peer is not installed, crashed, hung or failed; the message says which, for the bench's notes."""


class PeerWorker:
    """A peer's model loaded once in a child process; `timed(count)` is one greedy run of `count` tokens there (s)."""

    def __init__(self, name: str, timeout_s: float, **kwargs):
        self.name, self.timeout_s = name, timeout_s
        self.process = subprocess.Popen(
            [*CHILD, "--worker", name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.info = self._ask(kwargs)

    def timed(self, count: int) -> float:
        return self._ask({"count": count})["seconds"]

    def _ask(self, request: dict) -> dict:
        # Popen was given stdin, stdout and stderr as pipes (text): none is None
        process = self.process
        stdin, stdout, stderr = cast(
            "tuple[IO[str], IO[str], IO[str]]", (process.stdin, process.stdout, process.stderr)
        )
        try:
            stdin.write(json.dumps(request) + "\n")
            stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone; reading says why
        ready, _, _ = select.select([stdout], [], [], self.timeout_s)
        line = stdout.readline() if ready else None
        if line is None:
            self.close()
            raise PeerFailed(f"{self.name} did not answer within {self.timeout_s:g} s and was stopped")
        if not line:
            self.process.wait()
            raise PeerFailed(_failure(self.name, self.process.returncode, stderr.read()))
        answer = json.loads(line)
        if "skipped" in answer:
            raise PeerFailed(answer["skipped"])
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def __enter__(self) -> PeerWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve(name: str) -> None:
    """A worker's loop: the keyword arguments, then one timed run per request line, until end of input."""
    factory, missing = TIMERS[name]
    timer = factory(**json.loads(sys.stdin.readline()))
    if timer is None:
        print(json.dumps(missing), flush=True)
        return
    timed, info = timer
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        print(json.dumps({"seconds": timed(json.loads(line)["count"])}), flush=True)


def main() -> None:
    if sys.argv[1] == "--worker":
        _serve(sys.argv[2])
        return
    kwargs = json.loads(sys.stdin.read())
    print(json.dumps(PEERS[sys.argv[1]](**kwargs)))


if __name__ == "__main__":
    main()
