"""Entropy-coded symbol streams: how a ticket stores its supermask with ``mask_coding="entropy"``.

Each masked layer's free-position symbols (mask bits today, alphabet 2; the same coder takes any
alphabet up to 2**16, e.g. coat levels or re-randomization rounds) become one *record*, the
smallest of three methods (ties go to the lower method number):

- 0 raw: ``ceil(n * b / 8)`` bytes, symbol i in bits ``[i*b, i*b + b)`` of the little-endian bit
  stream (bit j is bit ``j % 8`` of byte ``j // 8``), ``b = max(1, ceil(log2(alphabet)))``, zero padding;
- 1 constant: ``u16`` symbol (every one of the n >= 1 symbols is it);
- 2 rANS: ``u16 k`` (2 <= k), ``k x u16`` present symbols (strictly increasing), ``k x u32`` frequencies
  (each >= 1, summing to 2**24), ``u32 w``, ``w x u32`` words: constriction's ``AnsCoder`` (32-bit
  words, 64-bit state, 24-bit precision) with exactly those frequencies (see ``rans_words``).

A record starts with its method byte; integers are little-endian; the records follow each other in
the order of the layers with no other framing. The README ("Entropy-coded supermask") specifies the
decoder step by step; ``timm_fslt/reference_decoder.py`` implements it without this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import constriction
import numpy as np

PRECISION = 24
TOTAL = 1 << PRECISION  # the frequencies of a record sum to this
MAX_ALPHABET = 1 << 16
RAW, CONSTANT, RANS = 0, 1, 2
METHODS = {RAW: "raw", CONSTANT: "constant", RANS: "rans"}
MASK_CODINGS = ("auto", "raw", "entropy")
_STATE_LOW = 1 << 32  # the decoder refills a word when its state falls below this


class CodingError(ValueError):
    """A coded stream that does not decode to exactly the symbols its header promises."""


@dataclass(frozen=True)
class Record:
    """One layer's record: its method and its size in bytes (method byte included)."""
    method: str
    bytes: int


def check_mask_coding(value) -> str:
    if not isinstance(value, str) or value not in MASK_CODINGS:
        raise ValueError(f"mask_coding must be one of {', '.join(repr(c) for c in MASK_CODINGS)}, got {value!r}")
    return value


def choose(mask_coding: str, raw_bytes: int, entropy_bytes: int) -> str:
    """The coding a ticket stores: ``"auto"`` is entropy-coded only when that is smaller than raw."""
    if mask_coding == "auto":
        return "entropy" if entropy_bytes < raw_bytes else "raw"
    return mask_coding


def symbol_bits(alphabet: int) -> int:
    return max(1, (alphabet - 1).bit_length())


def raw_bytes(n: int, alphabet: int) -> int:
    return (n * symbol_bits(alphabet) + 7) // 8


def max_record_bytes(n: int, alphabet: int) -> int:
    """No record is larger than the raw one: a larger constant or rANS record is never written."""
    return 1 + raw_bytes(n, alphabet)


def entropy_bits(counts: Sequence[int]) -> float:
    """The empirical (order-0) entropy of a stream with these symbol counts, in bits (total)."""
    n = sum(int(c) for c in counts)
    return float(sum(c * math.log2(n / c) for c in (int(c) for c in counts) if c))


def _check_alphabet(alphabet: int) -> None:
    if not isinstance(alphabet, int) or not 2 <= alphabet <= MAX_ALPHABET:
        raise ValueError(f"alphabet must be an int in [2, {MAX_ALPHABET}], got {alphabet!r}")


def quantize(counts: Sequence[int]) -> np.ndarray:
    """Integer frequencies (int64, each >= 1, sum ``TOTAL``) for the counts of the present symbols.

    ``1 + floor(c * (TOTAL - k) / n)`` each; the remaining ``R < k`` units go one each to the R
    symbols with the largest remainders ``c * (TOTAL - k) mod n`` (ties: the lower symbol first).
    """
    c = [int(x) for x in counts]
    k, n = len(c), sum(c)
    if k < 2 or min(c) < 1 or k > TOTAL:
        raise ValueError(f"quantize needs at least 2 present symbols, each counted at least once, got {c[:8]}")
    scaled = [x * (TOTAL - k) for x in c]
    freqs = [1 + s // n for s in scaled]
    rest = TOTAL - sum(freqs)
    order = sorted(range(k), key=lambda i: (-(scaled[i] % n), i))
    for i in order[:rest]:
        freqs[i] += 1
    return np.array(freqs, dtype=np.int64)


def _model(freqs: np.ndarray):
    """constriction's categorical model with exactly ``freqs``.

    Its fast quantization gives symbol i the left cumulative ``floor(C_i * scale) + i`` with C_i the
    running sum of the given weights and ``scale = (2**24 - k) / sum(weights)``. Given the weights
    ``freqs - 1`` (integers < 2**53, exact in float64), ``scale`` is exactly 1.0 and the left
    cumulative is ``sum(freqs[:i])``: the model is ``freqs`` exactly (tests/test_entropy_coding.py
    compares its words with an encoder written from the documented algorithm)."""
    return constriction.stream.model.Categorical((freqs - 1).astype(np.float64), perfect=False)


def rans_words(index: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """uint32 words of the symbols' indices (into the present symbols) under ``freqs``.

    The encoder starts from the state x = 0 and takes the symbols last to first: for a symbol of
    frequency f and cumulative c, if ``x >> 40 >= f`` it emits the word ``x mod 2**32`` and sets
    ``x >>= 32``; then ``x = (x // f) << 24 | (c + x mod f)``. The words are the emitted ones in
    order, then the final state's nonzero 32-bit words, the low one first (none when x = 0)."""
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.ascontiguousarray(index, dtype=np.int32), _model(freqs))
    return np.asarray(coder.get_compressed(), dtype=np.uint32)


def rans_decode(words: np.ndarray, freqs: np.ndarray, n: int) -> np.ndarray:
    """The n indices ``words`` hold under ``freqs``, or ``CodingError`` unless the decoder then
    stands exactly where the encoder started (every word read, state 0)."""
    if len(words) and int(words[-1]) == 0:
        raise CodingError("its rANS words end in a zero word, which no encoder writes")
    coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
    index = coder.decode(_model(freqs), n) if n else np.zeros(0, dtype=np.int32)
    if tuple(coder.pos()) != (0, 0):
        raise CodingError("its rANS words do not end where its symbols do (words left over or a nonzero "
                          "final state)")
    return index


def pack(symbols: np.ndarray, alphabet: int) -> bytes:
    """Raw method: b-bit fields, little-endian bit order, zero padding."""
    b = symbol_bits(alphabet)
    values = np.asarray(symbols, dtype=np.uint32).reshape(-1)
    bits = ((values[:, None] >> np.arange(b, dtype=np.uint32)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bits, bitorder="little").tobytes()


def unpack(data: bytes, n: int, alphabet: int) -> np.ndarray:
    b = symbol_bits(alphabet)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[n * b:].any():
        raise CodingError("its raw record's padding bits are not zero")
    if b == 1:
        return bits[:n].astype(np.uint32)
    fields = bits[:n * b].reshape(n, b).astype(np.uint32)
    symbols = (fields << np.arange(b, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    if n and int(symbols.max()) >= alphabet:
        raise CodingError(f"its raw record holds a symbol >= the alphabet size {alphabet}")
    return symbols


def encode(symbols: np.ndarray, alphabet: int) -> bytes:
    """One stream's smallest record (method byte first)."""
    _check_alphabet(alphabet)
    symbols = np.asarray(symbols).reshape(-1)
    n = symbols.size
    if n and (int(symbols.min()) < 0 or int(symbols.max()) >= alphabet):
        raise ValueError(f"symbols must lie in [0, {alphabet}), got [{int(symbols.min())}, {int(symbols.max())}]")
    candidates = [bytes([RAW]) + pack(symbols, alphabet)]
    counts = np.bincount(symbols.astype(np.int64), minlength=alphabet) if n else np.zeros(alphabet, np.int64)
    present = np.flatnonzero(counts)
    if len(present) == 1:
        candidates.append(bytes([CONSTANT]) + int(present[0]).to_bytes(2, "little"))
    elif len(present) >= 2 and 1 + 2 + 6 * len(present) + 4 < len(candidates[0]):
        freqs = quantize(counts[present])
        lookup = np.zeros(alphabet, dtype=np.int32)
        lookup[present] = np.arange(len(present), dtype=np.int32)
        words = rans_words(lookup[symbols.astype(np.int64)], freqs)
        candidates.append(b"".join([bytes([RANS]), len(present).to_bytes(2, "little"),
                                    present.astype("<u2").tobytes(), freqs.astype("<u4").tobytes(),
                                    len(words).to_bytes(4, "little"), words.astype("<u4").tobytes()]))
    return min(candidates, key=len)  # (min keeps the first of equal sizes: the lower method)


def encode_streams(streams: Sequence[np.ndarray], alphabet: int) -> tuple[bytes, list[Record]]:
    records = [encode(s, alphabet) for s in streams]
    return b"".join(records), [Record(METHODS[r[0]], len(r)) for r in records]


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = memoryview(data), 0

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or self.at + size > len(self.data):
            raise CodingError(f"it ends inside {what} ({len(self.data) - self.at} bytes left, {size} needed)")
        out = self.data[self.at:self.at + size]
        self.at += size
        return out

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "little")


def decode_streams(data: bytes, sizes: Sequence[int], alphabet: int) -> tuple[list[np.ndarray], list[Record]]:
    """The streams of ``sizes`` symbols each that ``encode_streams`` wrote, and their records.

    Every size is bounded by the caller (the ticket's recorded counts); nothing here allocates more
    than those counts or ``data`` can need. Anything malformed is a ``CodingError`` naming the
    stream (``layer i``) and what is wrong."""
    _check_alphabet(alphabet)
    reader, streams, records = _Reader(bytes(data)), [], []
    for i, n in enumerate(sizes):
        start = reader.at
        try:
            streams.append(_decode_one(reader, int(n), alphabet))
        except CodingError as err:
            raise CodingError(f"layer {i}'s record: {err}") from None
        records.append(Record(METHODS[reader.data[start]], reader.at - start))
    if reader.at != len(reader.data):
        raise CodingError(f"{len(reader.data) - reader.at} bytes follow the last layer's record")
    return streams, records


def _decode_one(reader: _Reader, n: int, alphabet: int) -> np.ndarray:
    method = reader.uint(1, "the method byte")
    if method == RAW:
        return unpack(bytes(reader.take(raw_bytes(n, alphabet), "the raw symbols")), n, alphabet)
    if method == CONSTANT:
        symbol = reader.uint(2, "the constant symbol")
        if n < 1 or symbol >= alphabet:
            raise CodingError(f"a constant record of symbol {symbol} for {n} symbols (alphabet {alphabet})")
        return np.full(n, symbol, dtype=np.uint32)
    if method != RANS:
        raise CodingError(f"unknown method {method} (0 raw, 1 constant, 2 rANS)")
    k = reader.uint(2, "the symbol count")
    if not 2 <= k <= min(alphabet, n) or 1 + 2 + 6 * k + 4 > max_record_bytes(n, alphabet):
        raise CodingError(f"{k} present symbols for {n} symbols of an alphabet of {alphabet}")
    present = np.frombuffer(reader.take(2 * k, "the present symbols"), dtype="<u2").astype(np.int64)
    freqs = np.frombuffer(reader.take(4 * k, "the frequencies"), dtype="<u4").astype(np.int64)
    if (np.diff(present) <= 0).any() or int(present[-1]) >= alphabet:
        raise CodingError(f"its present symbols {present[:8].tolist()} are not strictly increasing below {alphabet}")
    if int(freqs.min()) < 1 or int(freqs.sum()) != TOTAL:
        raise CodingError(f"its frequencies sum to {int(freqs.sum())}, not 2**{PRECISION}, or one is 0")
    w = reader.uint(4, "the word count")
    if 1 + 2 + 6 * k + 4 + 4 * w > max_record_bytes(n, alphabet):  # checked before anything is decoded
        raise CodingError(f"its {w} rANS words make it larger than the raw record "
                          f"({max_record_bytes(n, alphabet)} bytes): no encoder writes that")
    words = np.frombuffer(reader.take(4 * w, "the rANS words"), dtype="<u4")
    index = rans_decode(words, freqs, n)
    if (np.bincount(index, minlength=k) == 0).any():
        raise CodingError("a present symbol never occurs in its stream")
    return present[index].astype(np.uint32)
