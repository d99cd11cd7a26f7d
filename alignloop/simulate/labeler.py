"""The simulated users' taste: a rule-based score of an answer to a prompt, and a noisy labeler built on it.

The score adds four named components, weighted by `Weights` (the defaults are `WEIGHTS`):

- on topic   + 2.0 × the share of the prompt's content words that the answer uses (0..1). Content words are
               lower-cased words minus stop words, minus the words of a request that say what to do rather than
               what about ("explain", "sentence", "tip", ...), with a plural "s" stripped.
- finished   + 1.0 when the answer ends with sentence punctuation (. ! ? …, optionally followed by a closing
               quote or bracket) and was not cut off: a finish_reason of "length" is unfinished whatever its
               last character.
- concise    − 0.025 per word beyond 40 (a penalty that grows with length, without bound).
- repetitive − 2.0 × the share of the answer's word 3-grams that repeat an earlier one (0..1).

So the best answer scores 3.0: it mentions what was asked about, stops by itself at the end of a sentence,
within 40 words, without looping. Thumbs up means a score of at least 2.0; a rating of 1..7 buckets the
score at 0, 0.5, 1, 1.5, 2 and 2.5.

`Labeler` turns the score into feedback with label noise, as AlpacaFarm's simulated annotators do (they flip
25% of pairwise preferences):
- `prefer`: the higher score wins, then the choice is flipped with probability `noise` (a tie is a coin flip).
- `rank`: every pair of answers is compared as `prefer` does (each flipped with probability `noise`), then
  the answers are ordered by wins, ties by score. With two answers that is exactly one `prefer`.
- `thumbs`: up iff score >= 2.0, flipped with probability `noise`.
- `rating`: the score's bucket, moved one step up or down (at random) with probability `noise`, kept in 1..7.
- `judge`: noise-free, 1 / 0.5 / 0 for a better / equal / worse first answer: for win rates.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from itertools import combinations

# English function words, and the instruction words of a request: neither says what the prompt is about, so
# an answer repeating them ("In one sentence, ...") is not thereby on topic.
STOP_WORDS = frozenset((
    "a", "about", "above", "after", "again", "against", "all", "also", "am", "an", "and", "any", "are",
    "as", "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by",
    "can", "could", "did", "do", "does", "doing", "down", "during", "each", "either", "else", "ever",
    "every", "few", "for", "from", "further", "had", "has", "have", "having", "he", "her", "here",
    "hers", "herself", "him", "himself", "his", "how", "i", "if", "in", "into", "is", "it", "its",
    "itself", "just", "let", "like", "me", "might", "more", "most", "must", "my", "myself", "no", "nor",
    "not", "now", "of", "off", "on", "once", "one", "only", "or", "other", "our", "ours", "ourselves",
    "out", "over", "own", "please", "same", "shall", "she", "should", "so", "some", "something", "such",
    "than", "that", "the", "their", "theirs", "them", "themselves", "then", "there", "these", "they",
    "this", "those", "through", "to", "too", "under", "until", "up", "upon", "us", "very", "via", "was",
    "way", "we", "were", "what", "when", "where", "which", "while", "who", "whom", "why", "will",
    "with", "would", "yes", "yet", "you", "your", "yours", "yourself", "yourselves",
    # instruction words
    "briefly", "beginner", "child", "common", "compare", "con", "cons", "describe", "detail", "example",
    "explain", "fact", "give", "idea", "important", "know", "kid", "matter", "misconception", "name",
    "pro", "pros", "question", "say", "sentence", "short", "simple", "summarize", "summary",
    "surprising", "teach", "tell", "term", "thing", "tip", "two", "use", "word", "write",
))

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Sentence punctuation, optionally followed by closing quotes or brackets.
_FINISHED = re.compile(r"""[.!?…]["'”’)\]]*$""")


@dataclass(frozen=True)
class Weights:
    """The score's weights and the labeler's cut-offs; see the module docstring for what each one does."""

    on_topic: float = 2.0
    finished: float = 1.0
    per_extra_word: float = 0.025
    concise_words: int = 40
    repetition: float = 2.0
    thumbs_up_at: float = 2.0
    rating_edges: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)  # six edges: ratings 1..7

    @property
    def best(self) -> float:
        return self.on_topic + self.finished


WEIGHTS = Weights()


@dataclass(frozen=True)
class Answer:
    """An answer as the chat API returned it: its text and why generation stopped ("stop", "length", ...)."""

    text: str
    finish_reason: str | None = None


AnswerLike = Answer | str


@dataclass(frozen=True)
class Components:
    """The raw, unweighted components of one score."""

    on_topic: float  # share of the prompt's content words present, 0..1
    finished: float  # 1.0 or 0.0
    extra_words: int  # words beyond Weights.concise_words
    repetition: float  # share of repeated word 3-grams, 0..1

    def total(self, weights: Weights = WEIGHTS) -> float:
        return (weights.on_topic * self.on_topic + weights.finished * self.finished
                - weights.per_extra_word * self.extra_words - weights.repetition * self.repetition)


def _stem(word: str) -> str:
    # A crude plural strip, applied to prompt and answer alike, so "holes" matches "hole".
    word = word.removesuffix("'s")
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def words(text: str) -> list[str]:
    """Lower-cased, stemmed words of `text`."""
    return [_stem(w) for w in _WORD.findall(text.lower())]


def content_words(text: str) -> set[str]:
    """The words of `text` that say what it is about (stop and instruction words removed)."""
    # Checked before and after stemming: "does" must not survive as "doe", nor "tips" as "tip".
    return {s for w in _WORD.findall(text.lower())
            if w not in STOP_WORDS and (s := _stem(w)) not in STOP_WORDS}


def is_finished(text: str, finish_reason: str | None = None) -> bool:
    """Ends with sentence punctuation and was not cut off by the token limit."""
    return finish_reason != "length" and bool(_FINISHED.search(text.rstrip()))


def repetition(text: str) -> float:
    """Share of the word 3-grams of `text` that repeat an earlier one (0 for fewer than two 3-grams)."""
    ws = words(text)
    grams = [tuple(ws[i:i + 3]) for i in range(len(ws) - 2)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _as_answer(answer: AnswerLike) -> Answer:
    return answer if isinstance(answer, Answer) else Answer(answer)


def components(prompt: str, answer: AnswerLike, weights: Weights = WEIGHTS) -> Components:
    """The score's components for `answer` to `prompt` (the user's last message)."""
    a = _as_answer(answer)
    topic = content_words(prompt)
    on_topic = len(topic & content_words(a.text)) / len(topic) if topic else 0.0
    return Components(on_topic=on_topic, finished=1.0 if is_finished(a.text, a.finish_reason) else 0.0,
                      extra_words=max(0, len(a.text.split()) - weights.concise_words),
                      repetition=repetition(a.text))


def score(prompt: str, answer: AnswerLike, weights: Weights = WEIGHTS) -> float:
    """Deterministic score of `answer` (text, or Answer with its finish_reason) to `prompt`; higher is better,
    at most `weights.best`."""
    return components(prompt, answer, weights).total(weights)


def rating_of(value: float, weights: Weights = WEIGHTS) -> int:
    """The noise-free 1..7 rating of a score."""
    return 1 + sum(value >= edge for edge in weights.rating_edges)


def describe(weights: Weights = WEIGHTS) -> str:
    """The rules in a few lines, with the weights in force (for --help)."""
    w = weights
    return (f"score = {w.on_topic:g} x on-topic (share of the prompt's content words used) "
            f"+ {w.finished:g} x finished (ends with . ! ? and finish_reason != length) "
            f"- {w.per_extra_word:g} x words beyond {w.concise_words} "
            f"- {w.repetition:g} x share of repeated word 3-grams; best {w.best:g}. "
            f"Thumbs up iff score >= {w.thumbs_up_at:g}; rating 1-7 by score at "
            f"{', '.join(f'{e:g}' for e in w.rating_edges)}. Noise flips comparisons (a ranking is sorted by "
            "noisy pairwise wins) and thumbs, and moves a rating by one.")


class Labeler:
    """A simulated user: scores answers with `score` and labels them with noise (see the module docstring).

    The random choices come from one generator seeded by `seed`; `fork(key)` gives an independent labeler per
    request, so that results do not depend on the order in which threads reach it."""

    def __init__(self, noise: float = 0.25, seed: int | str = 0, weights: Weights = WEIGHTS) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], not {noise}")
        self.noise, self.seed, self.weights = noise, seed, weights
        # random hashes a str seed with sha512: the same stream in every process, whatever PYTHONHASHSEED.
        self.rng = random.Random(str(seed))

    def fork(self, key: int | str) -> Labeler:
        """A labeler with the same noise and weights and its own generator, seeded by (seed, key)."""
        return Labeler(self.noise, f"{self.seed}/{key}", self.weights)

    def score(self, prompt: str, answer: AnswerLike) -> float:
        return score(prompt, answer, self.weights)

    def _flip(self) -> bool:
        return self.rng.random() < self.noise

    def _a_wins(self, score_a: float, score_b: float) -> bool:
        if score_a == score_b:
            return self.rng.random() < 0.5  # no preference to flip: either answer
        return (score_a > score_b) != self._flip()

    def prefer(self, prompt: str, a: AnswerLike, b: AnswerLike) -> int:
        """0 if the user prefers `a`, 1 if `b`: the higher score, flipped with probability `noise`."""
        return 0 if self._a_wins(self.score(prompt, a), self.score(prompt, b)) else 1

    def rank(self, prompt: str, answers: list[AnswerLike]) -> list[int]:
        """Indices of `answers`, best first: sorted by wins over all noisy pairwise comparisons, ties by score
        (then by position)."""
        scores = [self.score(prompt, a) for a in answers]
        wins = [0] * len(answers)
        for i, j in combinations(range(len(answers)), 2):
            wins[i if self._a_wins(scores[i], scores[j]) else j] += 1
        return sorted(range(len(answers)), key=lambda i: (-wins[i], -scores[i], i))

    def thumbs(self, prompt: str, answer: AnswerLike) -> bool:
        """True (up) iff the score reaches `weights.thumbs_up_at`, flipped with probability `noise`."""
        return (self.score(prompt, answer) >= self.weights.thumbs_up_at) != self._flip()

    def rating(self, prompt: str, answer: AnswerLike) -> int:
        """1..7 from the score's bucket; with probability `noise` one step up or down, kept within 1..7."""
        value = rating_of(self.score(prompt, answer), self.weights)
        if self._flip():
            value += self.rng.choice((-1, 1))
        return min(7, max(1, value))

    def judge(self, prompt: str, a: AnswerLike, b: AnswerLike) -> float:
        """Noise-free: 1.0 if `a` scores higher, 0.5 if equal, 0.0 if lower (for win rates)."""
        sa, sb = self.score(prompt, a), self.score(prompt, b)
        return 1.0 if sa > sb else 0.5 if sa == sb else 0.0
