"""Text in and out of an export folder: the tokenizer (tokenizers), the chat template (jinja2), streaming
detokenisation."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from balcony_edge.common.errors import BalconyError
from balcony_edge.runtime.core.manifest import Manifest

ALLOWED_CONTROL_CHARACTERS = "\t\n\r"


class PromptError(BalconyError):
    """A prompt is empty, not text, or holds characters no tokenizer should see."""


def check_prompt_text(text: object) -> str:
    """The prompt itself if it is non-empty valid text: no undecodable bytes, no control characters but tab and
    newlines."""
    if not isinstance(text, str):
        raise PromptError(f"the prompt is a {type(text).__name__}, not text; pass a str (decode bytes as UTF-8 first)")
    if not text.strip():
        raise PromptError("the prompt is empty; type some text")
    for index, char in enumerate(text):
        if "\udc80" <= char <= "\udcff":  # how Python carries a byte that is not UTF-8 (surrogateescape)
            raise PromptError(
                f"the prompt is not valid UTF-8 (byte 0x{ord(char) - 0xDC00:02x} at character {index}); pass UTF-8 text"
            )
        if "\ud800" <= char <= "\udfff":
            raise PromptError(
                f"the prompt holds a lone surrogate U+{ord(char):04X} at character {index}; pass valid Unicode text"
            )
        if unicodedata.category(char) == "Cc" and char not in ALLOWED_CONTROL_CHARACTERS:
            raise PromptError(
                f"the prompt holds control character U+{ord(char):04X} at "
                f"character {index}; remove it (tab and newlines are fine)"
            )
    return text


class TextCodec:
    """Encodes prompts and chat messages to token ids and decodes ids back to text."""

    def __init__(self, folder: Path, manifest: Manifest):
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise BalconyError(f"{folder} has no tokenizer.json; export the model again")
        self.tokenizer = Tokenizer.from_file(str(path))
        generation = manifest.generation
        self.bos_token = self._token(generation.bos_token_id)
        self.eos_token = self._token(generation.eos_token_ids[0] if generation.eos_token_ids else None)
        self.template = None
        if manifest.chat_template:
            source = (Path(folder) / manifest.chat_template).read_text()
            try:
                self.template = chat_template_environment().from_string(source)
            except jinja2.TemplateError as err:
                raise BalconyError(
                    f"the chat template {manifest.chat_template} of {folder} does not parse ({_first_line(err)}); "
                    "export again (`balcony-edge export --force`)"
                ) from None

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.tokenizer.id_to_token(token_id) or "")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of plain text (special tokens such as BOS added only when asked)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def token_text(self, token_id: int) -> str:
        """One token's text, special tokens spelt out (what log-probabilities and /tokenize show)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        """Text of token ids, special tokens left out."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template (plain concatenation without one)."""
        check_messages(messages)
        if self.template is None:
            return self.encode("\n".join(m["content"] for m in messages))
        variables = dict(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        return self.encode(render_bounded(self.template, variables))


ROLES = ("system", "user", "assistant")


def check_messages(messages: object) -> None:
    """Refuse a conversation that is not a non-empty list of {role, content} dicts with valid text."""
    if not isinstance(messages, list) or not messages:
        raise PromptError(
            "the conversation is empty; give a list of messages such as [{'role': 'user', 'content': 'Hi'}]"
        )
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise PromptError(
                f"message {index} is not a dict with a role and a text "
                "content; give {'role': 'user', 'content': '...'}"
            )
        if message["role"] not in ROLES:
            raise PromptError(f"message {index} has role {message['role'][:40]!r}; use one of {', '.join(ROLES)}")
        if message["role"] != "assistant":  # the model's own answers are taken as it wrote them
            check_prompt_text(message["content"])


MAX_RENDERED_CHARS = 4_000_000  # a rendered conversation longer than this fits no context: stop rendering


def render_bounded(template: jinja2.Template, variables: dict) -> str:
    """A chat template rendered, stopped with a one-line PromptError past MAX_RENDERED_CHARS (a template that writes
    without end must not take the memory) or when the template refuses the conversation or the sandbox stops it."""
    parts, size = [], 0
    try:
        for part in template.generate(**variables):
            size += len(part)
            if size > MAX_RENDERED_CHARS:
                raise PromptError(
                    f"the chat template wrote more than {MAX_RENDERED_CHARS:,} characters; "
                    "shorten the conversation or fix the template"
                )
            parts.append(part)
    except SecurityError as err:
        raise PromptError(
            f"the chat template tried what its sandbox forbids ({_first_line(err)}); fix the template"
        ) from None
    except jinja2.TemplateError as err:  # raise_exception() of the template itself, or a runtime error in it
        raise PromptError(f"the chat template refused the conversation: {_first_line(err)}") from None
    return "".join(parts)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _raise_template_error(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' tojson: plain json.dumps (jinja2's own escapes <, >, & and ' for HTML)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which transformers' templates use to mark the assistant's part:
    rendered as its body (transformers also records where it lies, which only training masks need)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with `*` on a string or list refused when the product would pass MAX_RENDERED_CHARS: one
    expression such as 'A' * 4000000000 would otherwise allocate before any output is counted."""

    intercepted_binops = frozenset(["*"])

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if (
                    isinstance(sequence, (str, list, tuple))
                    and isinstance(count, int)
                    and len(sequence) * count > MAX_RENDERED_CHARS
                ):
                    raise SecurityError(f"a repetition of {len(sequence) * count:,} items is longer than any prompt")
        return super().call_binop(context, operator, left, right)


def chat_template_environment() -> ImmutableSandboxedEnvironment:
    """A Jinja environment that renders chat templates as transformers does: the same options, extensions
    (loop controls, generation blocks), filters (tojson) and globals (raise_exception, strftime_now)."""
    environment = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_template_error
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment


class TextStream:
    """The answer's text as tokens arrive (tokenizers' DecodeStream: each token decoded once, incomplete UTF-8 held
    back), and how much of it may be shown: up to the first stop string, holding back what may begin one."""

    def __init__(self, codec: TextCodec, stop: tuple[str, ...] = ()):
        self.codec, self.stop = codec, tuple(s for s in stop if s)
        self._reach = max(
            map(len, self.stop), default=0
        )  # a stop string that ends in new text starts this far back at most
        self._stream = DecodeStream(skip_special_tokens=True)
        self._pending: list[int] = []  # ids whose bytes do not yet make whole characters
        self.text = ""
        self.stop_at: int | None = None  # where the first stop string begins, once one has appeared
        self._shown = 0

    def push(self, token_id: int) -> None:
        """Add one generated token (not the end-of-sequence one)."""
        chunk = self._stream.step(self.codec.tokenizer, token_id)
        if chunk is None:
            self._pending.append(token_id)
            return
        self._pending.clear()
        searched_from = max(0, len(self.text) - self._reach)
        self.text += chunk
        if self.stop_at is None:
            found = [self.text.find(s, searched_from) for s in self.stop]
            self.stop_at = min((f for f in found if f >= 0), default=None)

    def finish(self) -> None:
        """End of generation: bytes still held back show as they decode (an incomplete character as U+FFFD)."""
        if self._pending and self.stop_at is None:
            self.text += self.codec.decode(self._pending)
            self._pending.clear()

    def take(self, final: bool) -> str:
        """The text that became visible since the last call (final: everything left, up to a stop string)."""
        if self.stop_at is not None:
            visible = self.stop_at
        elif final:
            visible = len(self.text)
        else:
            held = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            visible = len(self.text) - held
        piece = self.text[self._shown : max(self._shown, visible)]
        self._shown = max(self._shown, visible)
        return piece
