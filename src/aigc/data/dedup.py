"""De-duplication: exact (hash of normalised text) and near-duplicate (MinHash + LSH, `datasketch`).

Exact: BLAKE2b of the case-folded text with whitespace collapsed; the first copy is kept.

Near: a document is the set of its shingles, three consecutive tokens, where a token is a run of ASCII
letters/digits or a single non-ASCII character (so Chinese text shingles by characters). Signatures are
computed for a whole batch of documents at once with numpy, never with a Python loop per shingle:

    bytes → token spans (byte classes) → token hashes (polynomial prefix sums, mod 2**64)
          → shingle hashes (3 tokens, mixed) → NUM_PERM hash functions x*a + b (mod 2**32) → min per document

Documents are then visited in input order: datasketch's `MinHashLSH` returns candidates among the
documents already kept, and a candidate counts when the two signatures agree on at least `threshold`
of their slots (the MinHash estimate of Jaccard similarity). The first copy survives, and the work is
linear in the number of documents plus the candidates LSH returns: never all pairs. A vectorised
pre-pass finds the documents that share an LSH band with any other; only those enter the index, so
memory stays near 300 bytes per document (the signature) instead of ~2.5 kB per index entry.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import numpy as np

from aigc.data.clean import collapse_spaces

NUM_PERM = 64
SHINGLE_TOKENS = 3  # fixed: the shingle formula below combines exactly three token hashes
_SEED = 20240601
_PRIME = 0x100000001B3  # odd, so it has an inverse mod 2**64
_PRIME_INV = pow(_PRIME, -1, 2**64)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
_NO_SHINGLE = np.iinfo(np.uint32).max


def _byte_classes() -> np.ndarray:
    """0 = separator (ASCII non-alphanumeric), 1 = ASCII letter/digit, 2 = UTF-8 lead byte, 3 = continuation."""
    classes = np.zeros(256, dtype=np.uint8)
    for byte in range(128):
        classes[byte] = 1 if chr(byte).isalnum() else 0
    classes[0x80:0xC0] = 3
    classes[0xC0:] = 2
    return classes


_BYTE_CLASS = _byte_classes()


def normalised_key(text: str) -> bytes:
    """A 16-byte digest of the case-folded text with whitespace collapsed (the exact-duplicate key)."""
    return hashlib.blake2b(collapse_spaces(text.casefold()).encode("utf-8"), digest_size=16).digest()


class ExactDedup:
    """Remembers the keys seen so far (16 bytes per distinct document)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        key = normalised_key(text)
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


_POWERS: dict[int, np.ndarray] = {}


def _powers(base: int, n: int) -> np.ndarray:
    """base**0 … base**(n-1) mod 2**64 (numpy's uint64 products wrap: that is the modulus we want).
    Cached and grown by doubling, since every batch needs them."""
    cached = _POWERS.get(base)
    if cached is None or len(cached) < n:
        size = max(n, 2 * len(cached) if cached is not None else 1 << 16)
        cached = np.full(size, base, dtype=np.uint64)
        cached[0] = 1
        cached = _POWERS[base] = np.cumprod(cached, dtype=np.uint64)
    return cached[:n]


# Bytes hashed per numpy pass: the pass keeps ~60 bytes of temporaries per input byte, so a long
# document is hashed in pieces of this size (cut where no token spans the cut: hashes are the same).
PIECE_BYTES = 1 << 18
# Shingles per pass of the NUM_PERM hash functions: that pass keeps NUM_PERM * 4 bytes per shingle.
SHINGLE_CHUNK = 1 << 16


def _token_hashes(texts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Position-independent 64-bit hashes of every token, and the index of the text each belongs to,
    in order, one group of at most about PIECE_BYTES of text at a time."""
    pieces, owners = [], []
    for i, text in enumerate(texts):
        for piece in _byte_pieces(text.casefold().encode("utf-8")):
            pieces.append(piece)
            owners.append(i)
    start, size = 0, 0
    for end in range(1, len(pieces) + 1):
        size += len(pieces[end - 1]) + 1
        if end == len(pieces) or size + len(pieces[end]) > PIECE_BYTES:
            hashes, piece_index = _hash_tokens(pieces[start:end])
            yield hashes, np.asarray(owners[start:end], dtype=np.int64)[piece_index]
            start, size = end, 0


def _byte_pieces(data: bytes) -> list[bytes]:
    """`data` cut into pieces of about PIECE_BYTES, each cut before a separator byte (ASCII, not a
    letter or digit) so that no token spans two pieces."""
    pieces, start = [], 0
    while len(data) - start > PIECE_BYTES:
        view = np.frombuffer(
            data, dtype=np.uint8, offset=start + PIECE_BYTES, count=min(PIECE_BYTES, len(data) - start - PIECE_BYTES)
        )
        separators = np.flatnonzero(_BYTE_CLASS[view] == 0)
        if not len(separators):
            break  # a token longer than a piece: keep the rest whole
        cut = start + PIECE_BYTES + int(separators[0])
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    return pieces


def _hash_tokens(parts: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Token hashes of `parts` joined by a separator, and the index of the part each belongs to."""
    data = np.frombuffer(b" ".join(parts), dtype=np.uint8)  # (N,) bytes, texts joined by a separator
    text_starts = np.cumsum([0] + [len(p) + 1 for p in parts[:-1]])
    classes = _BYTE_CLASS[data]
    word = classes == 1
    starts_mask = (word & ~np.concatenate(([False], word[:-1]))) | (classes == 2)
    starts = np.flatnonzero(starts_mask)
    boundaries = np.append(np.flatnonzero(starts_mask | (classes == 0)), len(data))
    ends = boundaries[np.searchsorted(boundaries, starts, side="right")]
    # prefix[i] = sum_{j<i} (byte_j + 1) * P**-j, so a token's hash is (prefix[e] - prefix[s]) * P**s.
    weighted = (data.astype(np.uint64) + np.uint64(1)) * _powers(_PRIME_INV, len(data))
    prefix = np.concatenate(([np.uint64(0)], np.cumsum(weighted, dtype=np.uint64)))
    hashes = (prefix[ends] - prefix[starts]) * _powers(_PRIME, len(data))[starts]
    owners = np.searchsorted(text_starts, starts, side="right") - 1
    return hashes, owners


def _mix(x: np.ndarray) -> np.ndarray:
    """A bijective finaliser (splitmix64 style) so every bit of a shingle hash depends on all its tokens."""
    x = x ^ (x >> np.uint64(31))
    x = x * _MIX
    return x ^ (x >> np.uint64(29))


class MinHasher:
    """Vectorised MinHash signatures, `NUM_PERM` uint32 values per document."""

    def __init__(self, num_perm: int = NUM_PERM, seed: int = _SEED):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self._a = (rng.integers(0, 2**31, size=num_perm, dtype=np.uint32) << np.uint32(1)) | np.uint32(1)
        self._b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32; a row of all 0xFFFFFFFF means the text has no shingle."""
        signatures = np.full((len(texts), self.num_perm), _NO_SHINGLE, dtype=np.uint32)
        if not texts:
            return signatures
        # Token hashes come in groups; the last two tokens of a group are carried into the next, so
        # shingles spanning two groups are counted as in one pass over all the text.
        carry_hashes, carry_owners = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
        for hashes, owners in _token_hashes(texts):
            hashes, owners = np.concatenate((carry_hashes, hashes)), np.concatenate((carry_owners, owners))
            if len(hashes) >= SHINGLE_TOKENS:
                self._update(signatures, hashes, owners)
            carry_hashes, carry_owners = hashes[-(SHINGLE_TOKENS - 1) :], owners[-(SHINGLE_TOKENS - 1) :]
        return signatures

    def _update(self, signatures: np.ndarray, hashes: np.ndarray, owners: np.ndarray) -> None:
        """Fold the shingles of consecutive tokens `hashes` (owned by text `owners`) into `signatures`."""
        same_text = owners[:-2] == owners[2:]  # the three tokens belong to one text
        shingles = hashes[:-2] * _MIX + hashes[1:-1] * np.uint64(_PRIME) + hashes[2:]
        shingles, shingle_owner = _mix(shingles[same_text]), owners[:-2][same_text]
        for start in range(0, len(shingles), SHINGLE_CHUNK):  # min is associative: chunks merge exactly
            chunk, owner = shingles[start : start + SHINGLE_CHUNK], shingle_owner[start : start + SHINGLE_CHUNK]
            present, first = np.unique(owner, return_index=True)
            # (P, S) layout: each hash function runs along a contiguous row, and reduceat along rows is
            # far faster than along columns.
            values = self._a[:, None] * (chunk >> np.uint64(32)).astype(np.uint32)[None, :]  # wraps mod 2**32
            values += self._b[:, None]
            signatures[present] = np.minimum(signatures[present], np.minimum.reduceat(values, first, axis=1).T)


def _shares_a_band(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N,) bool: the documents whose signature equals some other document's on at least one LSH band.

    Only these can ever be LSH candidates, so only they need to enter the datasketch index. A band is
    reduced to one 64-bit key (a random linear hash of its values, wrapping), so equal bands always
    get equal keys; a rare key collision merely adds a document to the index.
    """
    count = len(signatures)
    shared = np.zeros(count, dtype=bool)
    weights = np.random.default_rng(_SEED).integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
    for band in range(bands):
        values = signatures[:, band * rows : (band + 1) * rows].astype(np.uint64)  # (N, r)
        keys = (values * weights).sum(axis=1, dtype=np.uint64)  # (N,)
        order = np.argsort(keys, kind="stable")
        repeated = keys[order][1:] == keys[order][:-1]  # (N-1,) equal to its neighbour in sorted order
        shared[order[1:][repeated]] = True
        shared[order[:-1][repeated]] = True
    return shared


def near_duplicates(signatures: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask (N,): True for each document that nearly duplicates an earlier kept one."""
    # Deferred: a slow import that only this path needs.
    from datasketch import LeanMinHash, MinHashLSH

    count, num_perm = signatures.shape
    duplicate = np.zeros(count, dtype=bool)
    needed = math.ceil(threshold * num_perm - 1e-9)  # slots that must agree
    # datasketch cannot band above ~0.95 with 64 slots; candidates are verified against `threshold` below.
    lsh = MinHashLSH(threshold=min(threshold, 0.95), num_perm=num_perm, hashfunc=hash)
    has_shingles = (signatures != _NO_SHINGLE).any(axis=1)
    # A document that shares no band with any other is kept without touching the index: this keeps
    # the index (about 2 kB per entry) to the few documents that could be duplicates at all.
    suspects = has_shingles & _shares_a_band(signatures, lsh.b, lsh.r)
    for i in np.flatnonzero(suspects):
        row = signatures[i]
        sketch = LeanMinHash(seed=_SEED, hashvalues=row, scheme="affine32")
        for candidate in lsh.query(sketch):
            if np.count_nonzero(signatures[candidate] == row) >= needed:
                duplicate[i] = True
                break
        else:
            lsh.insert(int(i), sketch, check_duplication=False)
    return duplicate
