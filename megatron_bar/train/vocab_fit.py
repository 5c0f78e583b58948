"""The tokenizer of a training stage, checked against the model's vocabulary rows.

A real checkpoint's embedding has more rows than its tokenizer has tokens (Olmo 2:
100352 rows for 100278 tokens; the rest is padding for fast matmuls), so the rule is
``tokenizer size <= rows``, checked before any data is read. A tokenizer named in the
config (``data.tokenizer``) must be the checkpoint's own (same fingerprint): ids from
another vocabulary would index rows trained for other tokens.

New special tokens (``data.add_special_tokens``) get the tokenizer's next ids, so they
take the unused padded rows first; the embedding grows only for the tokens beyond the
last row. Either way their rows start as the mean of the tokenizer's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megatron_bar.data.tokenizer import Tokenizer, load_tokenizer

TOKENIZER_SUBDIR = "tokenizer"


class TokenizerMismatch(ValueError):
    pass


@dataclass
class StageTokenizer:
    tokenizer: Tokenizer
    base_size: int  # tokens before data.add_special_tokens
    rows: int  # vocabulary rows of the checkpoint the stage starts from

    @property
    def new_ids(self) -> range:
        """Ids of the tokens this stage added (their rows start as the mean row)."""
        return range(self.base_size, self.tokenizer.vocab_size)

    @property
    def model_vocab_size(self) -> int:
        """Rows of the model the stage trains: the checkpoint's, grown only if needed."""
        return max(self.rows, self.tokenizer.vocab_size)

    def describe(self) -> str | None:
        """One line on where the added tokens went, or None when none were added."""
        if not self.new_ids:
            return None
        added = [self.tokenizer.id_to_token(i) for i in self.new_ids]
        first, last = self.new_ids[0], self.new_ids[-1]
        if self.tokenizer.vocab_size <= self.rows:
            return (f"special tokens {added} take unused vocabulary rows {first}..{last} "
                    f"of {self.rows} (the embedding keeps its size)")
        return (f"special tokens {added} (ids {first}..{last}): no unused rows left for "
                f"{self.tokenizer.vocab_size - self.rows} of them, the vocabulary grows "
                f"{self.rows} -> {self.tokenizer.vocab_size}")


def stage_tokenizer(load: str | Path, rows: int, tokenizer_path: str | None = None,
                    add_special_tokens: Sequence[str] = ()) -> StageTokenizer:
    """The tokenizer of checkpoint ``load`` (or ``tokenizer_path``, which must be the same
    tokenizer), checked to fit its ``rows`` vocabulary rows, with ``add_special_tokens``
    added. Raises :class:`TokenizerMismatch` naming both sizes when it does not fit."""
    load = Path(load)
    own = load / TOKENIZER_SUBDIR
    path = Path(tokenizer_path) if tokenizer_path else own
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tokenizer there (set data.tokenizer, or convert the "
                                f"model with its tokenizer files)")
    tokenizer = load_tokenizer(path)
    if tokenizer_path and own.is_dir() and path.resolve() != own.resolve():
        checkpoint_tok = load_tokenizer(own)
        if tokenizer.fingerprint() != checkpoint_tok.fingerprint():
            raise TokenizerMismatch(
                f"data.tokenizer {path} ({tokenizer.vocab_size} tokens, fingerprint "
                f"{tokenizer.fingerprint()[:12]}) is not the tokenizer of {load} "
                f"({checkpoint_tok.vocab_size} tokens, fingerprint {checkpoint_tok.fingerprint()[:12]})")
    if tokenizer.vocab_size > rows:
        raise TokenizerMismatch(
            f"tokenizer {path} has {tokenizer.vocab_size} tokens but the model in {load} has "
            f"{rows} vocabulary rows: is it the model's tokenizer?")
    base = tokenizer.vocab_size
    if add_special_tokens:
        tokenizer.add_special_tokens(list(add_special_tokens))
    return StageTokenizer(tokenizer, base, rows)
