"""Training records (chat and plain text), reading them from JSONL, and the chat template.

Record formats, one JSON object per line:

* chat (SFT)::

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...],
     "domain": "math"}                # optional

* text (mid-training)::

    {"text": "...", "domain": "code"}  # optional domain

Other keys (ids, sources, ...) are ignored.

Chat template (Olmo 2 / Tulu 3 style). With ``B`` the tokenizer's BOS token and
``E`` its EOS token, a conversation renders as::

    B<|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{reply}E\\n<|tool|>\\n{tool}\\n<|assistant|>\\n{reply}E

i.e. each turn is ``<|role|>`` + ``"\\n"`` + content, followed by ``"\\n"`` for
system/user/tool turns and by ``E`` for assistant turns (plus ``"\\n"`` when
another turn follows). The four role markers are special tokens
(:data:`CHAT_SPECIAL_TOKENS`), so each is exactly one id.

Loss mask: 1 exactly on the tokens of assistant contents and on the ``E``
that closes each assistant turn (the model must learn to stop); 0 on BOS, the
role markers, the newlines and every non-assistant content.

Each segment is tokenized on its own and the ids are concatenated, so the mask
boundaries are exact by construction. The price is that the ids can differ
from tokenizing the whole rendered string at a segment seam (a BPE merge across
``"\\n"`` + content); the model sees the same text either way.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence, Union

from megatron_bar.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
ROLE_MARKERS: dict[str, str] = {role: f"<|{role}|>" for role in ROLES}
CHAT_SPECIAL_TOKENS: tuple[str, ...] = tuple(ROLE_MARKERS[r] for r in ROLES)


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


def add_chat_special_tokens(tokenizer: Tokenizer) -> list[int]:
    """Add the role markers as special tokens (idempotent); returns their ids.

    May grow ``tokenizer.vocab_size``: the model's embedding must cover it.
    """
    return tokenizer.add_special_tokens(list(CHAT_SPECIAL_TOKENS))


class ChatTemplate:
    """Renders :class:`ChatRecord` to token ids and a loss mask (see the module docstring).

    The tokenizer must already have the role markers as single tokens; call
    :func:`add_chat_special_tokens` first. This is not done implicitly because
    it changes the vocabulary size the model has to be built with.
    """

    def __init__(self, tokenizer: Tokenizer, add_bos: bool = True):
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        self.marker_ids: dict[str, int] = {}
        for role, marker in ROLE_MARKERS.items():
            token_id = tokenizer.token_to_id(marker)
            if token_id is None or tokenizer.encode(marker) != [token_id]:
                raise ValueError(
                    f"role marker {marker!r} is not a single special token of {tokenizer!r}; "
                    f"call add_chat_special_tokens(tokenizer) first"
                )
            self.marker_ids[role] = token_id
        self.newline_ids = tokenizer.encode("\n")

    def render_text(self, record: ChatRecord) -> str:
        """The conversation as a string (for inspection; training uses :meth:`encode`)."""
        tok = self.tokenizer
        eos = tok.id_to_token(tok.eos_id)
        parts = [tok.id_to_token(tok.bos_id)] if self.add_bos else []
        for k, m in enumerate(record.messages):
            parts.append(f"{ROLE_MARKERS[m.role]}\n{m.content}")
            last = k == len(record.messages) - 1
            if m.role == "assistant":
                parts.append(eos if last else eos + "\n")
            else:
                parts.append("\n")
        return "".join(parts)

    def encode(self, record: ChatRecord) -> TokenizedDocument:
        tokens: list[int] = []
        mask: list[int] = []

        def put(ids: Sequence[int], trained: int) -> None:
            tokens.extend(ids)
            mask.extend([trained] * len(ids))

        if self.add_bos:
            put([self.tokenizer.bos_id], 0)
        for k, m in enumerate(record.messages):
            put([self.marker_ids[m.role]], 0)
            put(self.newline_ids, 0)
            content = self.tokenizer.encode(m.content)
            last = k == len(record.messages) - 1
            if m.role == "assistant":
                put(content, 1)
                put([self.tokenizer.eos_id], 1)
                if not last:
                    put(self.newline_ids, 0)
            else:
                put(content, 0)
                put(self.newline_ids, 0)
        return TokenizedDocument(tokens, mask, record.domain)

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """The conversation so far plus the assistant marker: what a policy continues
        from when it generates a reply (RLVR rollouts, evaluation). Identical to the
        prefix that :meth:`encode` produces before that reply's first trained token."""
        if not messages or messages[-1].role == "assistant":
            raise ValueError("a prompt ends with a non-assistant message")
        record = ChatRecord(tuple(messages) + (Message("assistant", ""),))
        doc = self.encode(record)
        return doc.tokens[: doc.loss_mask.index(1)]


def encode_text(record: TextRecord, tokenizer: Tokenizer) -> TokenizedDocument:
    """Mid-training text: ``encode(text) + [EOS]``, every token trained.

    No BOS: documents are separated by EOS only, as in Olmo pretraining.
    """
    tokens = tokenizer.encode(record.text) + [tokenizer.eos_id]
    return TokenizedDocument(tokens, [1] * len(tokens), record.domain)


def tokenize_records(records: Iterable[Record], tokenizer: Tokenizer, add_bos: bool = True) -> list[TokenizedDocument]:
    """Tokenize a mix of chat and text records (chat needs the role markers added)."""
    template: ChatTemplate | None = None
    docs: list[TokenizedDocument] = []
    for record in records:
        if isinstance(record, ChatRecord):
            if template is None:
                template = ChatTemplate(tokenizer, add_bos=add_bos)
            docs.append(template.encode(record))
        elif isinstance(record, TextRecord):
            docs.append(encode_text(record, tokenizer))
        else:
            raise TypeError(f"expected ChatRecord or TextRecord, got {type(record).__name__}")
    return docs
