"""Tokenizers for the BAR data path: one interface, two backends.

``Tokenizer`` is the only type the rest of the data path sees. Two backends
implement it:

* :class:`HFTokenizer` wraps a Hugging Face ``tokenizers`` ``tokenizer.json``.
  This is the format of the real Olmo 2 vocabulary, loaded offline from a file.
* :class:`SentencePieceTokenizer` wraps a SentencePiece ``.model``. It exists so
  tests and toy runs can train a small vocabulary in a second, deterministically
  (:func:`train_sentencepiece`), without downloading anything.

Conventions shared by both backends, because the chat template and the packer
rely on them:

* ``encode(text)`` never adds BOS/EOS. Callers add them explicitly, so there is
  exactly one place (the chat template / text encoder) that decides.
* Special tokens that occur literally in the text are encoded to their single
  id (Hugging Face's default behaviour). This is what makes ``"<tool_call>"``
  one token once it has been added.
* ``add_special_tokens`` appends new tokens at the end of the vocabulary, in
  order, and is idempotent. The model's embedding must cover ``vocab_size``: a
  padded checkpoint's unused rows first, else grown (megatron_bar.train.vocab_fit).
* ``save(dir)`` writes a folder that :func:`load_tokenizer` reads back to an
  identical tokenizer (same :meth:`Tokenizer.fingerprint`), added tokens
  included, and carries every other file of the folder the tokenizer was loaded
  from (:data:`TOKENIZER_FILES`: the chat template, ``special_tokens_map.json``,
  ``generation_config.json``, ...), so a checkpoint's or an export's tokenizer
  is the one it was given.
* ``chat_template`` is the tokenizer's own chat template (``chat_template.jinja``
  next to it, else ``tokenizer_config.json``'s ``chat_template``), or None.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

# File names inside a saved tokenizer folder.
SPM_MODEL_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# SentencePiece models cannot store tokens added after training, so a saved
# SentencePiece tokenizer carries this small JSON next to its ``.model``.
SIDECAR_FILE = "megatron_bar_tokenizer.json"
_SIDECAR_FORMAT_VERSION = 1
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Every file of a tokenizer folder that travels with it (checkpoints, exports).
TOKENIZER_FILES = (
    HF_TOKENIZER_FILE,
    HF_CONFIG_FILE,
    HF_SPECIAL_TOKENS_MAP_FILE,
    SPM_MODEL_FILE,
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    CHAT_TEMPLATE_FILE,
    SIDECAR_FILE,  # added special tokens of a SentencePiece tokenizer
)


def read_chat_template(folder: str | os.PathLike) -> str | None:
    """The chat template of the tokenizer folder ``folder``, as transformers finds it:
    ``chat_template.jinja`` first, else ``tokenizer_config.json``'s ``chat_template``
    (a string, or a list of named templates of which ``default`` is used)."""
    folder = Path(folder)
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / HF_CONFIG_FILE
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except json.JSONDecodeError as exc:
        raise ValueError(f"cannot parse {config}: {exc}") from exc
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def copy_companion_files(src: str | os.PathLike, dst: str | os.PathLike, skip: Sequence[str] = ()) -> list[str]:
    """Copy the :data:`TOKENIZER_FILES` present in ``src`` to ``dst`` (but ``skip``)."""
    import shutil

    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if name in skip or not (src / name).is_file():
            continue
        dst.mkdir(parents=True, exist_ok=True)
        if (src / name).resolve() != (dst / name).resolve():
            shutil.copy2(src / name, dst / name)
        copied.append(name)
    return copied


class Tokenizer(abc.ABC):
    """What the data path needs from a tokenizer.

    ``vocab_size`` counts every id the tokenizer can emit, added tokens
    included; ids are ``0 .. vocab_size - 1``.
    """

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def bos_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def pad_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def special_tokens(self) -> list[str]:
        """Tokens that are never split and that ``decode`` can skip, in id order."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``; no BOS/EOS is added."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text for ``ids``. Special tokens are rendered as their text unless skipped."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of ``token`` as one vocabulary entry, or None if it is not one."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of ``token_id`` (the raw piece, e.g. ``'▁the'``), or None."""

    @abc.abstractmethod
    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Make each of ``tokens`` a special token; return the id of each, in order.

        A token not yet in the vocabulary gets the next id (appended at the
        end, in the order given). A token already in the vocabulary keeps its
        id, so calling this twice with the same tokens changes nothing.
        """

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer to ``directory`` so that ``load_tokenizer(directory)`` reads it back."""

    @property
    def source_dir(self) -> Path | None:
        """The folder the tokenizer was loaded from (its companion files live there)."""
        return None

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own chat template (see :func:`read_chat_template`), or None."""
        return read_chat_template(self.source_dir) if self.source_dir is not None else None

    def fingerprint(self) -> str:
        """sha256 hex digest of the id <-> token mapping and the special tokens.

        Two tokenizers with the same fingerprint assign the same ids to the same
        vocabulary entries and agree on BOS/EOS/PAD and the special tokens, so a
        checkpoint trained with one can be used with the other. (It does not hash
        the segmentation rules, e.g. BPE merges or unigram scores.)
        """
        payload = {
            "vocab": [self.id_to_token(i) for i in range(self.vocab_size)],
            "special_tokens": self.special_tokens,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }
        blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


def _split_on_specials(text: str, pattern: re.Pattern[str] | None) -> list[tuple[str, bool]]:
    """Split ``text`` into (chunk, is_special) pieces; empty chunks are dropped."""
    if pattern is None:
        return [(text, False)] if text else []
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for match in pattern.finditer(text):
        if match.start() > pos:
            pieces.append((text[pos : match.start()], False))
        pieces.append((match.group(0), True))
        pos = match.end()
    if pos < len(text):
        pieces.append((text[pos:], False))
    return pieces


def _specials_pattern(tokens: Iterable[str]) -> re.Pattern[str] | None:
    # Longest first, so that "<|assistant|>" wins over a hypothetical "<|a".
    ordered = sorted(set(tokens), key=lambda t: (-len(t), t))
    if not ordered:
        return None
    return re.compile("|".join(re.escape(t) for t in ordered))


# --------------------------------------------------------------------------- #
# SentencePiece
# --------------------------------------------------------------------------- #


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model plus special tokens added after training.

    SentencePiece itself only treats its CONTROL pieces (``<s>``, ``</s>``,
    ``<pad>``) and USER_DEFINED pieces as atomic, and never parses CONTROL
    pieces out of text. This wrapper splits the text on every special token
    first (control, unknown, user-defined and added ones) and only hands the
    plain text in between to SentencePiece, so all special tokens behave the
    same way as in the Hugging Face backend. Tokens added with
    :meth:`add_special_tokens` that are not in the model get ids
    ``model_size, model_size + 1, ...``.

    If the model has no pad piece (``pad_id() == -1``, e.g. Llama's), ``pad_id``
    falls back to ``eos_id``; padding is always loss-masked so the choice only
    has to be a valid id.
    """

    def __init__(self, model_path: str | os.PathLike, added_special_tokens: Sequence[str] = ()):
        import sentencepiece as spm

        self._model_path = Path(model_path)
        if not self._model_path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {self._model_path}")
        self._sp = spm.SentencePieceProcessor(model_file=str(self._model_path))
        self._model_size = self._sp.get_piece_size()
        self._added: list[str] = []  # beyond the model; id = model_size + index
        self._extra_special: list[str] = []  # add_special_tokens() calls, in order (for save)
        # Every token that is matched in text before SentencePiece sees it.
        self._special_ids: dict[str, int] = {}
        user_defined = self._user_defined_ids()
        for i in range(self._model_size):
            if self._sp.is_control(i) or self._sp.is_unknown(i) or i in user_defined:
                self._special_ids[self._sp.id_to_piece(i)] = i
        self._refresh_specials()
        self.add_special_tokens(added_special_tokens)

    def _user_defined_ids(self) -> set[int]:
        # The Python API has no is_user_defined(); read the piece types from the model proto.
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        user_defined = pb.ModelProto.SentencePiece.USER_DEFINED
        return {i for i, piece in enumerate(proto.pieces) if piece.type == user_defined}

    def _refresh_specials(self) -> None:
        self._pattern = _specials_pattern(self._special_ids)
        self._id_to_special = {i: tok for tok, i in self._special_ids.items()}

    @property
    def model_path(self) -> Path:
        return self._model_path

    @property
    def source_dir(self) -> Path:
        return self._model_path.parent

    @property
    def vocab_size(self) -> int:
        return self._model_size + len(self._added)

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    @property
    def special_tokens(self) -> list[str]:
        return [tok for tok, _ in sorted(self._special_ids.items(), key=lambda kv: kv[1])]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for chunk, is_special in _split_on_specials(text, self._pattern):
            if is_special:
                ids.append(self._special_ids[chunk])
            else:
                ids.extend(self._sp.encode(chunk, out_type=int))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        id_to_special = self._id_to_special
        parts: list[str] = []
        run: list[int] = []  # consecutive ordinary ids, decoded by SentencePiece together
        for raw in ids:
            i = int(raw)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range for vocab_size {self.vocab_size}")
            if i in id_to_special:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(id_to_special[i])
            else:
                run.append(i)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        if token in self._special_ids:
            return self._special_ids[token]
        i = self._sp.piece_to_id(token)
        # piece_to_id returns unk_id for anything unknown.
        if i == self._sp.unk_id() and token != self._sp.id_to_piece(i):
            return None
        return i

    def id_to_token(self, token_id: int) -> str | None:
        if 0 <= token_id < self._model_size:
            return self._sp.id_to_piece(token_id)
        if self._model_size <= token_id < self.vocab_size:
            return self._added[token_id - self._model_size]
        return None

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        if isinstance(tokens, str):
            raise TypeError("add_special_tokens expects a sequence of tokens, not a single string")
        ids: list[int] = []
        for token in tokens:
            if not token:
                raise ValueError("cannot add an empty special token")
            existing = self.token_to_id(token)
            if existing is None:
                existing = self.vocab_size
                self._added.append(token)
            if token not in self._special_ids:
                self._special_ids[token] = existing
                self._extra_special.append(token)
            ids.append(existing)
        self._refresh_specials()
        return ids

    def save(self, directory: str | os.PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        copy_companion_files(self.source_dir, out, skip=(SPM_MODEL_FILE, SIDECAR_FILE, self._model_path.name))
        (out / SPM_MODEL_FILE).write_bytes(self._sp.serialized_model_proto())
        sidecar = {
            "format_version": _SIDECAR_FORMAT_VERSION,
            "kind": "sentencepiece",
            "model_file": SPM_MODEL_FILE,
            # Re-added in this order on load; the ids are recorded to check that.
            "added_special_tokens": [
                {"content": tok, "id": self._special_ids[tok]} for tok in self._extra_special
            ],
        }
        (out / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return out

    @classmethod
    def from_sidecar(cls, sidecar_path: str | os.PathLike) -> "SentencePieceTokenizer":
        """Load a tokenizer written by :meth:`save`, given its sidecar JSON."""
        sidecar_path = Path(sidecar_path)
        try:
            meta = json.loads(sidecar_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read tokenizer sidecar {sidecar_path}: {exc}") from exc
        if meta.get("kind") != "sentencepiece" or meta.get("format_version") != _SIDECAR_FORMAT_VERSION:
            raise ValueError(
                f"{sidecar_path}: unsupported sidecar (kind={meta.get('kind')!r}, "
                f"format_version={meta.get('format_version')!r})"
            )
        entries = meta.get("added_special_tokens", [])
        tok = cls(sidecar_path.parent / meta.get("model_file", SPM_MODEL_FILE))
        got = tok.add_special_tokens([e["content"] for e in entries])
        want = [e["id"] for e in entries]
        if got != want:
            raise ValueError(f"{sidecar_path}: added special tokens got ids {got}, expected {want}")
        return tok


def train_sentencepiece(
    corpus_lines: Iterable[str],
    vocab_size: int,
    out_path: str | os.PathLike,
    seed: int = 0,
    *,
    user_defined_symbols: Sequence[str] = (),
    model_type: str = "unigram",
) -> Path:
    """Train a SentencePiece model on ``corpus_lines`` and write it to ``out_path``.

    Deterministic: the same lines and arguments give a byte-identical
    ``.model`` file. That needs one training thread, no input sampling/shuffling
    (``input_sentence_size`` is the full corpus and ``shuffle_input_sentence``
    is off) and a fixed generator seed (``seed``; SentencePiece's seed is
    process-global, so it is set right before training).

    Other choices, and why:

    * ``byte_fallback=True`` and ``character_coverage=1.0``: any text encodes,
      nothing becomes ``<unk>``, so ``decode(encode(x)) == x``.
    * ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``,
      ``add_dummy_prefix=False``: no NFKC rewriting, whitespace kept, and no
      space invented at the start of each encoded chunk. Together they make the
      round trip exact.
    * ``split_digits=True``: digits are single tokens (arithmetic in the math domain).
    * ``user_defined_symbols``: pass the chat role markers here
      (``chat.CHAT_SPECIAL_TOKENS``) so they are atomic pieces of the model.
    * ids: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3.

    ``vocab_size`` must be reachable for the corpus (SentencePiece raises
    otherwise); with byte fallback it must exceed 256 + special + character pieces.
    """
    import sentencepiece as spm

    lines = [line for line in corpus_lines if line]
    if not lines:
        raise ValueError("train_sentencepiece: empty corpus")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type=model_type,
        num_threads=1,
        input_sentence_size=len(lines),
        shuffle_input_sentence=False,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        user_defined_symbols=list(user_defined_symbols),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, out_path)  # never leave a half-written model behind
    return out_path


# --------------------------------------------------------------------------- #
# Hugging Face tokenizers
# --------------------------------------------------------------------------- #

# Used only when neither the constructor nor a tokenizer_config.json names them.
_DEFAULT_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")
_DEFAULT_BOS_CANDIDATES = ("<s>", "<bos>", "<|bos|>")
_DEFAULT_PAD_CANDIDATES = ("<|pad|>", "<pad>")


def _read_hf_special_names(folder: Path) -> dict[str, str]:
    """bos/eos/pad token strings from tokenizer_config.json or special_tokens_map.json."""
    names: dict[str, str] = {}
    for fname in (HF_SPECIAL_TOKENS_MAP_FILE, HF_CONFIG_FILE):  # later file wins
        path = folder / fname
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"cannot parse {path}: {exc}") from exc
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key)
            if isinstance(value, dict):  # {"content": "...", "lstrip": ...}
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    return names


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer loaded offline from ``tokenizer.json``.

    ``tokenizer.json`` does not say which token is BOS/EOS/PAD; that lives in
    ``tokenizer_config.json`` next to it (Olmo 2: BOS = EOS = ``<|endoftext|>``,
    PAD = ``<|pad|>``). Explicit constructor arguments win over that file, and
    common names are tried last. A missing BOS or PAD falls back to EOS (Olmo's
    convention); a missing EOS is an error.

    Only the model and pre/post-tokenizer steps are used: the post-processor's
    BOS/EOS template is never applied (``add_special_tokens=False``).
    """

    def __init__(
        self,
        tokenizer_json: str | os.PathLike,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        from tokenizers import Tokenizer as _HFTok

        self._path = Path(tokenizer_json)
        if not self._path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {self._path}")
        try:
            self._tok = _HFTok.from_file(str(self._path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{self._path} is not a Hugging Face tokenizers file: {exc}") from exc
        self._config_dir = self._path.parent
        from_config = _read_hf_special_names(self._config_dir)
        eos = eos_token or from_config.get("eos_token") or self._first_present(_DEFAULT_EOS_CANDIDATES)
        if eos is None or self._tok.token_to_id(eos) is None:
            raise ValueError(
                f"{self._path}: cannot determine the EOS token (got {eos!r}); pass eos_token= "
                f"or put a tokenizer_config.json with 'eos_token' next to it"
            )
        bos = bos_token or from_config.get("bos_token") or self._first_present(_DEFAULT_BOS_CANDIDATES) or eos
        pad = pad_token or from_config.get("pad_token") or self._first_present(_DEFAULT_PAD_CANDIDATES) or eos
        for role, name in (("BOS", bos), ("PAD", pad)):
            if self._tok.token_to_id(name) is None:
                raise ValueError(f"{self._path}: {role} token {name!r} is not in the vocabulary")
        self._bos, self._eos, self._pad = bos, eos, pad

    def _first_present(self, candidates: Sequence[str]) -> str | None:
        return next((c for c in candidates if self._tok.token_to_id(c) is not None), None)

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def source_dir(self) -> Path:
        return self._config_dir

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._tok.token_to_id(self._bos)

    @property
    def eos_id(self) -> int:
        return self._tok.token_to_id(self._eos)

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id(self._pad)

    @property
    def special_tokens(self) -> list[str]:
        decoder = self._tok.get_added_tokens_decoder()
        return [decoder[i].content for i in sorted(decoder) if decoder[i].special]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range for vocab_size {self.vocab_size}")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        from tokenizers import AddedToken

        if isinstance(tokens, str):
            raise TypeError("add_special_tokens expects a sequence of tokens, not a single string")
        ids: list[int] = []
        for token in tokens:
            if not token:
                raise ValueError("cannot add an empty special token")
            # One at a time so new ids follow the order given. normalized=False:
            # match the literal text, as for the tokenizer's own special tokens.
            self._tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            ids.append(self._tok.token_to_id(token))
        return ids

    def save(self, directory: str | os.PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        copy_companion_files(self._config_dir, out, skip=(HF_TOKENIZER_FILE, HF_CONFIG_FILE))
        self._tok.save(str(out / HF_TOKENIZER_FILE))
        # Keep whatever else the source tokenizer_config.json said (chat
        # template, model_max_length, ...) and pin the three names we use.
        config: dict = {}
        source_config = self._config_dir / HF_CONFIG_FILE
        if source_config.is_file():
            config = json.loads(source_config.read_text(encoding="utf-8"))
        config.update(bos_token=self._bos, eos_token=self._eos, pad_token=self._pad)
        (out / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return out


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a file or folder, choosing the backend by file name.

    * ``megatron_bar_tokenizer.json`` (or a folder holding it): a SentencePiece
      tokenizer written by :meth:`SentencePieceTokenizer.save`, added tokens included.
    * ``*.model``: a SentencePiece model (with its sidecar's added tokens if a
      sidecar next to it names this model).
    * ``*.json`` (normally ``tokenizer.json``) or a folder holding
      ``tokenizer.json``: Hugging Face ``tokenizers``.
    * a folder holding ``tokenizer.model``: SentencePiece.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {p}")
    if p.is_dir():
        for name in (SIDECAR_FILE, HF_TOKENIZER_FILE, SPM_MODEL_FILE):
            if (p / name).is_file():
                return load_tokenizer(p / name)
        raise ValueError(
            f"no tokenizer found in folder {p}: expected one of "
            f"{SIDECAR_FILE}, {HF_TOKENIZER_FILE}, {SPM_MODEL_FILE}"
        )
    if p.name == SIDECAR_FILE:
        return SentencePieceTokenizer.from_sidecar(p)
    if p.suffix == ".model":
        sidecar = p.parent / SIDECAR_FILE
        if sidecar.is_file():
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            if meta.get("model_file") == p.name:
                return SentencePieceTokenizer.from_sidecar(sidecar)
        return SentencePieceTokenizer(p)
    if p.suffix == ".json":
        return HFTokenizer(p)
    raise ValueError(
        f"cannot tell the tokenizer type of {p}: expected a SentencePiece '*.model', "
        f"a Hugging Face 'tokenizer.json', or a folder containing one of them"
    )
