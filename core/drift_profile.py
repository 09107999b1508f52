"""The drift profile: what a fine-tuned model's training prompts look like, in features cheap to compare.

No model is involved: each prompt is reduced to cheap features (hashed byte 3-grams of the UTF-8 text, a log2
length bucket, the share of each script or character class, and which of its words the training data knew). At
job success the worker saves `build_profile(training user prompts)` as JSON under
`store_keys.drift_profile_key(job_id)`; the API's live monitor (`service.drift_monitor`) loads it with
`load_profile` and compares recent traffic with it (`Reference`, `js_divergence`).

Both sides must reduce a request to text the same way: `prompt_of_messages` for chat, the prompt itself for
completions.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import zlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from core.storage import ArtifactStore
from core.store_keys import drift_profile_key

logger = logging.getLogger(__name__)

PROFILE_VERSION = 1
NGRAM_N = 3
NGRAM_BUCKETS = 1024
VOCAB_BITS = 1 << 16  # a Bloom-like bitset of hashed training words (8 KiB)
LENGTH_BUCKETS = 24  # bucket b holds prompts of 2**(b-1) <= chars < 2**b characters; bucket 0 is empty text
SCRIPTS = ("latin", "digit", "space", "punct", "cyrillic", "greek", "cjk", "arabic", "other")
FEATURE_CHARS = 2048  # characters of a prompt that feed n-grams, scripts and words (the length is exact)
PROFILE_SAMPLE = 5000  # most training prompts the profile reads for n-grams and words (evenly spaced)
LENGTH_MARGIN = 2.0  # a prompt is out of range when shorter than min/2 or longer than max*2
_WEIGHTS = (0.5, 0.25, 0.25)  # masses of the 3-gram, length and script families
_WORD = re.compile(r"\w+")
_SPACES = re.compile(r"\s+")


def prompt_of_messages(messages: Iterable[Any]) -> str:
    """The text drift looks at in a chat request: the user messages' text, joined by newlines.

    Args:
        messages: OpenAI chat messages (dicts with `role` and `content`; content a string or a list of parts).

    Returns:
        The joined text ("" when there is no user text).
    """
    texts: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(
                str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
    return "\n".join(texts)


# --- features of one prompt --------------------------------------------------------------------------------


def _script(char: str) -> int:
    code = ord(char)
    if char.isspace():
        return 2
    if code < 128:
        if char.isalpha():
            return 0
        return 1 if char.isdigit() else 3
    for index, (low, high) in _SCRIPT_RANGES:
        if low <= code <= high:
            return index
    return 0 if char.isalpha() and code <= 0x24F else 8


_SCRIPT_RANGES = (
    (0, (0xC0, 0x24F)),  # Latin-1 letters and Latin Extended
    (5, (0x370, 0x3FF)),  # Greek
    (4, (0x400, 0x52F)),  # Cyrillic
    (7, (0x600, 0x6FF)),  # Arabic
    (6, (0x3040, 0x30FF)),  # kana
    (6, (0x4E00, 0x9FFF)),  # CJK ideographs
    (6, (0xAC00, 0xD7AF)),  # Hangul
    (3, (0x2000, 0x206F)),  # general punctuation
)


_ASCII_CLASSES = bytes(_script(chr(code)) if code < 128 else len(SCRIPTS) - 1 for code in range(256))
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def length_bucket(length: int) -> int:
    return min(LENGTH_BUCKETS - 1, length.bit_length())


def _ngram_buckets(text: str) -> array:
    """Buckets of the UTF-8 byte 3-grams of the lower-cased, space-normalised text (bytes hash fast)."""
    data = (" " + _SPACES.sub(" ", text[:FEATURE_CHARS].lower()).strip() + " ").encode("utf-8", "replace")
    crc32 = zlib.crc32
    return array("H", [crc32(data[i : i + NGRAM_N]) % NGRAM_BUCKETS for i in range(len(data) - NGRAM_N + 1)])


def _word_bits(text: str) -> set[int]:
    words = set(_WORD.findall(text[:FEATURE_CHARS].lower()))
    return {zlib.crc32(w.encode("utf-8", "replace")) % VOCAB_BITS for w in words}


@dataclass(frozen=True)
class PromptFeatures:
    """What the drift window remembers of one prompt."""

    ngrams: array  # bucket of every 3-gram (with repeats)
    length: int
    scripts: tuple[int, ...]  # characters per SCRIPTS entry
    words: frozenset[int]  # hashed distinct words

    @classmethod
    def of(cls, text: str) -> PromptFeatures:
        return cls(_ngram_buckets(text), len(text), _script_counts(text), frozenset(_word_bits(text)))


def _script_counts(text: str) -> tuple[int, ...]:
    """Characters per SCRIPTS entry: ASCII through one byte translation, the rest one by one."""
    head = text[:FEATURE_CHARS]
    ascii_part = head.encode("ascii", "ignore").translate(_ASCII_CLASSES)
    counts = [ascii_part.count(index) for index in range(len(SCRIPTS))]
    if len(ascii_part) != len(head):
        for char in _NON_ASCII.findall(head):
            counts[_script(char)] += 1
    return tuple(counts)


# --- the profile of the training prompts -------------------------------------------------------------------


class _Bits:
    def __init__(self, data: bytes | None = None) -> None:
        self.data = bytearray(data) if data is not None else bytearray(VOCAB_BITS // 8)

    def add(self, bits: Iterable[int]) -> None:
        for bit in bits:
            self.data[bit >> 3] |= 1 << (bit & 7)

    def novelty(self, bits: frozenset[int]) -> float:
        """Share of `bits` not set (0 for a prompt without words)."""
        if not bits:
            return 0.0
        unseen = sum(1 for bit in bits if not self.data[bit >> 3] & (1 << (bit & 7)))
        return unseen / len(bits)


def _sample(prompts: Sequence[str], limit: int) -> list[str]:
    if len(prompts) <= limit:
        return list(prompts)
    step = len(prompts) / limit
    return [prompts[int(i * step)] for i in range(limit)]


def _novelty_threshold(features: list[PromptFeatures]) -> float:
    """Word novelty above which a prompt counts as out of distribution.

    Estimated by two-fold cross-checking: the novelty of odd-indexed prompts against the words of the even ones
    is what a new in-distribution prompt looks like to a profile of about that size (a slight overestimate).
    """
    known = _Bits()
    for feat in features[::2]:
        known.add(feat.words)
    held_out = sorted(known.novelty(f.words) for f in features[1::2])
    q99 = held_out[min(len(held_out) - 1, int(0.99 * len(held_out)))] if held_out else 1.0
    return round(min(0.9, max(0.4, q99 + 0.1)), 4)


def _normalised(counts: Sequence[int]) -> list[float]:
    total = sum(counts)
    return [round(c / total, 8) if total else 0.0 for c in counts]


def build_profile(prompts: list[str]) -> dict[str, Any]:
    """The drift reference of a model: feature distributions and ranges of its training prompts.

    Args:
        prompts: the training examples' user prompts (`prompt_of_messages` of each chat example, or the
            legacy `prompt`). Up to PROFILE_SAMPLE evenly spaced prompts feed the n-grams, scripts and words;
            the length distribution and range use all of them.

    Returns:
        A JSON-serialisable dict (about 20 KB as JSON), the input of `DriftMonitor` and `observe`.

    Raises:
        ValueError: when `prompts` is empty.
    """
    if not prompts:
        raise ValueError("`prompts` is empty: a drift profile needs at least one training prompt")
    features = [PromptFeatures.of(p) for p in _sample(prompts, PROFILE_SAMPLE)]
    ngrams = [0] * NGRAM_BUCKETS
    scripts = [0] * len(SCRIPTS)
    vocabulary = _Bits()
    for feat in features:
        for bucket in feat.ngrams:
            ngrams[bucket] += 1
        scripts = [a + b for a, b in zip(scripts, feat.scripts, strict=True)]
        vocabulary.add(feat.words)
    lengths = [0] * LENGTH_BUCKETS
    for prompt in prompts:
        lengths[length_bucket(len(prompt))] += 1
    return {
        "version": PROFILE_VERSION,
        "prompts": len(prompts),
        "ngram_n": NGRAM_N,
        "ngrams": _normalised(ngrams),
        "lengths": _normalised(lengths),
        "scripts": dict(zip(SCRIPTS, _normalised(scripts), strict=True)),
        "ranges": {
            "length_min": min(len(p) for p in prompts),
            "length_max": max(len(p) for p in prompts),
            "novelty_max": _novelty_threshold(features),
        },
        "vocabulary": base64.b64encode(bytes(vocabulary.data)).decode("ascii"),
    }


@dataclass(frozen=True)
class Reference:
    """A parsed, validated profile."""

    distribution: list[float]  # the three families side by side, weighted, summing to 1
    length_min: int
    length_max: int
    novelty_max: float
    vocabulary: _Bits

    @classmethod
    def parse(cls, profile: dict[str, Any]) -> Reference:
        if profile.get("version") != PROFILE_VERSION:
            raise ValueError(f"unsupported drift profile version {profile.get('version')!r}")
        ngrams, lengths = list(profile["ngrams"]), list(profile["lengths"])
        scripts = [float(profile["scripts"].get(name, 0.0)) for name in SCRIPTS]
        if len(ngrams) != NGRAM_BUCKETS or len(lengths) != LENGTH_BUCKETS:
            raise ValueError("drift profile has the wrong number of buckets")
        ranges = profile["ranges"]
        vocabulary = base64.b64decode(profile["vocabulary"])
        if len(vocabulary) != VOCAB_BITS // 8:
            raise ValueError("drift profile vocabulary has the wrong size")
        return cls(
            combine([float(x) for x in ngrams], [float(x) for x in lengths], scripts),
            int(ranges["length_min"]),
            int(ranges["length_max"]),
            float(ranges["novelty_max"]),
            _Bits(vocabulary),
        )

    def out_of_distribution(self, feat: PromptFeatures) -> bool:
        too_short = feat.length * LENGTH_MARGIN < self.length_min
        too_long = feat.length > self.length_max * LENGTH_MARGIN
        return too_short or too_long or self.vocabulary.novelty(feat.words) > self.novelty_max


def combine(*families: Sequence[float]) -> list[float]:
    out: list[float] = []
    for weight, family in zip(_WEIGHTS, families, strict=True):
        total = sum(family)
        out.extend(weight * x / total if total else 0.0 for x in family)
    return out


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence, base 2 (0 for equal distributions, 1 for disjoint ones)."""
    total = 0.0
    for a, b in zip(p, q, strict=True):
        m = (a + b) / 2
        if a > 0:
            total += a * math.log2(a / m)
        if b > 0:
            total += b * math.log2(b / m)
    return min(1.0, max(0.0, total / 2))


def load_profile(store: ArtifactStore, job_id: str) -> dict[str, Any] | None:
    """The drift profile saved for `job_id`, or None when there is none or it cannot be read.

    Args:
        store: the artifact store.
        job_id: the fine-tuning job id (`ftjob-...`).

    Returns:
        The parsed profile dict, or None.
    """
    try:
        key = drift_profile_key(job_id)
        if not store.exists(key):
            return None
        with store.open(key) as handle:
            value = json.load(handle)
    except (OSError, ValueError) as exc:
        logger.warning("cannot read drift profile of job %s: %s", job_id, exc)
        return None
    return value if isinstance(value, dict) else None


def save_profile(store: ArtifactStore, job_id: str, prompts: list[str]) -> None:
    """Build the drift profile of `prompts` and save it under `drift_profile_key(job_id)` (atomically).

    Args:
        store: the artifact store.
        job_id: the fine-tuning job id.
        prompts: the training user prompts.

    Raises:
        ValueError: when `prompts` is empty.
    """
    store.write_bytes(drift_profile_key(job_id), json.dumps(build_profile(prompts)).encode())
    logger.info("saved drift profile of job %s (%d prompts)", job_id, len(prompts))
