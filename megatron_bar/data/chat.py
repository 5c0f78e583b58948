"""Training records (chat and plain text), reading them from JSONL, and the chat template.

Record formats, one JSON object per line:

* chat (SFT)::

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...],
     "domain": "math"}                # optional

* text (mid-training)::

    {"text": "...", "domain": "code"}  # optional domain

Other keys (ids, sources, ...) are ignored.

Chat format: the tokenizer's own chat template (``chat_template.jinja`` or
``tokenizer_config.json``'s ``chat_template``) renders a conversation exactly as
transformers' ``apply_chat_template`` does, and the rendered string is tokenized
whole, as transformers and vLLM tokenize it when serving: the ids trained on are
the ids the model will be served with. No token is added to the vocabulary for
the chat format; a template's role markers are whatever the vocabulary makes of
their text. A tokenizer without a template gets :data:`TULU_TEMPLATE` (Olmo 2
Instruct's Tulu layout, plus a ``tool`` role)::

    B<|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{reply}E\\n<|tool|>\\n{tool}\\n<|assistant|>\\n{reply}E

Loss mask: 1 on the tokens of each assistant reply as the template writes it,
its end token included (the model must learn to stop), 0 elsewhere. A template
with ``{% generation %}`` blocks marks the replies itself; otherwise a reply is
what rendering the conversation up to and including it adds to rendering it up
to the generation prompt before it. Character spans become token spans by
tokenizing the rendered prefix: where a token straddles a boundary (a merge
across it) the token is trained.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence, Union

from megatron_bar.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
ROLE_MARKERS: dict[str, str] = {role: f"<|{role}|>" for role in ROLES}
# The Tulu role markers: a SentencePiece vocabulary trained here keeps them as single
# pieces (``user_defined_symbols``); nothing adds them to an existing vocabulary.
CHAT_SPECIAL_TOKENS: tuple[str, ...] = tuple(ROLE_MARKERS[r] for r in ROLES)

# The default chat template, for a tokenizer that has none: Olmo 2 Instruct's Tulu
# template with a ``tool`` role added (the tool-use domain's data has tool turns).
TULU_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'tool' %}{{ '<|tool|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)


class DataError(ValueError):
    """Bad training data; ``path`` and ``line_number`` say where (when known)."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line_number: int | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.line_number = line_number


# --------------------------------------------------------------------------- #
# Records
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class ChatRecord:
    messages: tuple[Message, ...]
    domain: str | None = None


@dataclass(frozen=True)
class TextRecord:
    text: str
    domain: str | None = None


Record = Union[ChatRecord, TextRecord]


@dataclass
class TokenizedDocument:
    """One document as token ids, ready for packing.

    ``loss_mask[i]`` is 1 when token ``i`` is a training *target* (the model is
    scored on predicting it from the tokens before it). The packer shifts it
    together with the tokens.
    """

    tokens: list[int]
    loss_mask: list[int]
    domain: str | None = None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.loss_mask):
            raise ValueError(f"tokens ({len(self.tokens)}) and loss_mask ({len(self.loss_mask)}) differ in length")

    def __len__(self) -> int:
        return len(self.tokens)


def _parse_domain(obj: dict) -> str | None:
    domain = obj.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise ValueError(f"'domain' must be a string or null, got {type(domain).__name__}")
    return domain


def parse_chat_record(obj: object) -> ChatRecord:
    """Validate one decoded JSON object as a chat record; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" not in obj:
        raise ValueError("missing key 'messages'")
    raw = obj["messages"]
    if not isinstance(raw, list) or not raw:
        raise ValueError("'messages' must be a non-empty list")
    messages = []
    for k, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{k}] is not an object")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"messages[{k}] is missing key {key!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{k}] has role {m['role']!r}, expected one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{k}].content must be a string")
        messages.append(Message(m["role"], m["content"]))
    if not any(m.role == "assistant" for m in messages):
        # Nothing would be trained on; almost always a conversion bug upstream.
        raise ValueError("no assistant message")
    return ChatRecord(tuple(messages), _parse_domain(obj))


def parse_text_record(obj: object) -> TextRecord:
    """Validate one decoded JSON object as a text record; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "text" not in obj:
        raise ValueError("missing key 'text'")
    if not isinstance(obj["text"], str) or not obj["text"]:
        raise ValueError("'text' must be a non-empty string")
    return TextRecord(obj["text"], _parse_domain(obj))


_PARSERS = {"chat": parse_chat_record, "text": parse_text_record}


@dataclass
class JsonlReadResult:
    """Records read from one JSONL file, and the malformed lines that were skipped."""

    path: Path
    records: list[Record]
    bad_line_numbers: list[int] = field(default_factory=list)

    @property
    def num_bad_lines(self) -> int:
        return len(self.bad_line_numbers)


def _parse_line(raw: bytes, parse) -> Record:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8: {exc}") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from exc
    return parse(obj)


def read_jsonl(
    path: str | os.PathLike, kind: Literal["chat", "text"], max_bad_lines: int = 0
) -> JsonlReadResult:
    """Read chat or text records from a JSONL file.

    A malformed line (invalid UTF-8 or JSON, missing keys, unknown role, ...) is
    logged as a warning ``path:line: reason``, skipped and counted. The
    ``max_bad_lines + 1``-th malformed line raises :class:`DataError` naming the
    file and line. The default of 0 is strict on purpose: silently dropping
    data hides conversion bugs, so tolerance has to be asked for. Blank lines
    are not records and are not counted.
    """
    if kind not in _PARSERS:
        raise ValueError(f"kind must be one of {sorted(_PARSERS)}, got {kind!r}")
    if max_bad_lines < 0:
        raise ValueError(f"max_bad_lines must be >= 0, got {max_bad_lines}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    parse = _PARSERS[kind]
    result = JsonlReadResult(path=path, records=[])
    # Binary read: a bad byte sequence then spoils one line, not the whole file.
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = _parse_line(raw, parse)
            except ValueError as exc:
                result.bad_line_numbers.append(line_number)
                if result.num_bad_lines > max_bad_lines:
                    raise DataError(
                        f"{path}:{line_number}: malformed {kind} record ({exc}); "
                        f"{result.num_bad_lines} malformed lines exceed max_bad_lines={max_bad_lines}",
                        path=path,
                        line_number=line_number,
                    ) from exc
                logger.warning("%s:%d: skipping malformed %s record (%s)", path, line_number, kind, exc)
                continue
            result.records.append(record)
    if result.num_bad_lines:
        logger.warning("%s: skipped %d malformed lines", path, result.num_bad_lines)
    return result


# --------------------------------------------------------------------------- #
# Tokenization
# --------------------------------------------------------------------------- #


_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplate:
    """Renders :class:`ChatRecord` to token ids and a loss mask (see the module docstring)
    with ``template`` (default: the tokenizer's own, else :data:`TULU_TEMPLATE`)."""

    def __init__(self, tokenizer: Tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        own = tokenizer.chat_template
        self.template = template or own or TULU_TEMPLATE
        if template is None and own is None:
            logger.warning("%r has no chat template: using the Tulu template", tokenizer)
        self.has_generation_blocks = bool(_GENERATION_BLOCK.search(self.template))
        self._names = {
            "bos_token": tokenizer.id_to_token(tokenizer.bos_id),
            "eos_token": tokenizer.id_to_token(tokenizer.eos_id),
            "pad_token": tokenizer.id_to_token(tokenizer.pad_id),
        }

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool, spans: bool = False):
        from transformers.utils.chat_template_utils import render_jinja_template

        chat = [{"role": m.role, "content": m.content} for m in messages]
        rendered, indices = render_jinja_template(
            [chat], chat_template=self.template, add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=spans, **self._names)
        return (rendered[0], indices[0]) if spans else rendered[0]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as the template writes it (``apply_chat_template(tokenize=False)``)."""
        text = self._render(messages, add_generation_prompt)
        at = 0
        for k, m in enumerate(messages):  # a template that drops a role would drop data silently
            content = m.content.strip()  # templates may trim (Llama 3's does)
            found = text.find(content, at)
            if found < 0:
                raise ValueError(f"the chat template does not write messages[{k}] (role {m.role!r}): "
                                 f"does it know that role?")
            at = found + len(content)
        return text

    def render_text(self, record: ChatRecord) -> str:
        return self.render(record.messages)

    def assistant_spans(self, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant replies."""
        if self.has_generation_blocks:
            text, spans = self._render(messages, False, spans=True)
            self.render(messages)  # the roles check
            return text, [tuple(s) for s in spans]
        text = self.render(messages)
        spans = []
        for k, m in enumerate(messages):
            if m.role != "assistant":
                continue
            before = self._render(messages[:k], add_generation_prompt=True)
            through = self._render(messages[: k + 1], add_generation_prompt=False)
            if not (text.startswith(before) and text.startswith(through)):
                raise ValueError(
                    "the chat template renders a conversation's beginning differently from the whole "
                    "conversation, so the assistant replies cannot be told from it: give the template "
                    "{% generation %} blocks around the replies")
            if len(through) > len(before):
                spans.append((len(before), len(through)))
        return text, spans

    def _token_boundary(self, text: str, ids: list[int], pos: int, end: bool) -> int:
        """Number of tokens of ``ids`` before character ``pos`` of ``text`` (a token that
        straddles ``pos`` counts as inside the reply: after it at the start, before it at the end)."""
        if pos >= len(text):
            return len(ids)
        prefix = self.tokenizer.encode(text[:pos])
        n = len(prefix)
        if ids[:n] == prefix:
            return n
        common = next((i for i, (a, b) in enumerate(zip(ids, prefix)) if a != b), min(n, len(ids)))
        return common + 1 if end else common

    def encode(self, record: ChatRecord) -> TokenizedDocument:
        text, spans = self.assistant_spans(record.messages)
        tokens = self.tokenizer.encode(text)
        mask = [0] * len(tokens)
        for start, stop in spans:
            a = self._token_boundary(text, tokens, start, end=False)
            b = self._token_boundary(text, tokens, stop, end=True)
            mask[a:b] = [1] * (b - a)
        return TokenizedDocument(tokens, mask, record.domain)

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """The conversation so far with the template's generation prompt: what a policy
        continues from when it generates a reply (RLVR rollouts, evaluation), the ids
        ``apply_chat_template(messages, add_generation_prompt=True)`` gives."""
        if not messages or messages[-1].role == "assistant":
            raise ValueError("a prompt ends with a non-assistant message")
        return self.tokenizer.encode(self.render(messages, add_generation_prompt=True))


def encode_text(record: TextRecord, tokenizer: Tokenizer) -> TokenizedDocument:
    """Mid-training text: ``encode(text) + [EOS]``, every token trained.

    No BOS: documents are separated by EOS only, as in Olmo pretraining.
    """
    tokens = tokenizer.encode(record.text) + [tokenizer.eos_id]
    return TokenizedDocument(tokens, [1] * len(tokens), record.domain)


def tokenize_records(records: Iterable[Record], tokenizer: Tokenizer) -> list[TokenizedDocument]:
    """Tokenize a mix of chat and text records (chat with the tokenizer's chat template)."""
    template: ChatTemplate | None = None
    docs: list[TokenizedDocument] = []
    for record in records:
        if isinstance(record, ChatRecord):
            if template is None:
                template = ChatTemplate(tokenizer)
            docs.append(template.encode(record))
        elif isinstance(record, TextRecord):
            docs.append(encode_text(record, tokenizer))
        else:
            raise TypeError(f"expected ChatRecord or TextRecord, got {type(record).__name__}")
    return docs
