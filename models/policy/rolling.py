"""Rolling BLEU-4 and CIDEr over the latest images with references, updated in bounded time per change.

The server keeps one :class:`RollingScores` per model. Recomputing corpus scores over the whole window on
every feedback post cost 27 ms at 20 references and 4.1 s at 4,000; here a post costs the work of the
images it touches:

- BLEU-4 is exact at every step: corpus BLEU is a function of per-image sums (:func:`bleu_stats`), so an
  image entering, changing or leaving the window adds or subtracts its own share.
- CIDEr's idf comes from the whole window's references, so one image's change moves every image's score a
  little. Each image's score is cached; an update rescores the image it changes plus the ``refresh`` images
  scored longest ago against the current document frequencies, and the rolling value is the mean of the
  cached scores. It equals pycocoevalcap's CIDEr on the window whenever every image has been rescored since
  the last change (at once for windows of up to ``refresh + 1`` images, else within ``window / refresh``
  updates), and :meth:`RollingScores.exact` recomputes it outright.

The window is the ``window`` images that most recently got their first references; more references for an
image already in it update it in place (they do not move it to the front).

:meth:`RollingScores.scores` says what the numbers come from (``images``, ``references``) and reports CIDEr
only from :data:`MIN_CIDER_IMAGES` images on. CIDEr weighs each n-gram by ``log(images / images whose
references hold it)``: over one image every weight is 0, so CIDEr reads 0 whatever the captions, and over
a handful the words the images share weigh nothing and the rest at most ``log(images)``, so the value moves
with which few images happen to have references more than with the captions. From 10 images a word in one
image's references weighs ``log 10`` (2.3) against 0 for a word in all of them, and one image is a tenth of
the mean. (10 is a judgement, not a derivation. A window under 10 images never reports CIDEr.) BLEU-4 has
no corpus weights and is reported from the first image.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from reefcap.models.metrics import bleu_from_stats, bleu_stats, cider_image, ngrams, tokenize

N = 4
MIN_CIDER_IMAGES = 10  # images with references before CIDEr is reported (see the module docstring)


@dataclass
class _Image:
    hyp: str
    refs: list[str]
    hyp_counts: Counter = field(init=False)
    ref_counts: list[Counter] = field(init=False)
    grams: set = field(init=False)  # n-grams of its references, counted once each in the document frequencies
    bleu: tuple[int, int, list[int], list[int]] = field(init=False)
    cider: float = 0.0

    def __post_init__(self) -> None:
        self.hyp_counts = ngrams(self.hyp.split(), N)
        self.ref_counts = [ngrams(r.split(), N) for r in self.refs]
        self.grams = {g for c in self.ref_counts for g in c}
        self.bleu = bleu_stats(self.refs, self.hyp, N)


class RollingScores:
    """Corpus BLEU-4 and CIDEr of one model's captions over a window of images (see the module docstring).

    ``min_cider_images``: images with references before :meth:`scores` reports CIDEr (it is kept up to date
    below that all the same, so it is exact the moment it is reported)."""

    def __init__(self, window: int, refresh: int = 16, min_cider_images: int = MIN_CIDER_IMAGES) -> None:
        self.window, self.refresh, self.min_cider_images = window, refresh, min_cider_images
        self._images: OrderedDict[Hashable, _Image] = OrderedDict()
        self._stale: deque[Hashable] = deque()  # rescoring order: scored longest ago first
        self._doc_freq: Counter = Counter()
        self._test_len = self._ref_len = 0
        self._references = 0  # reference captions over the window's images
        self._correct, self._guess = [0] * N, [0] * N

    def __len__(self) -> int:
        return len(self._images)

    def update(self, key: Hashable, caption: str, references: Sequence[str], rescore: bool = True) -> None:
        """Set ``key``'s caption and full reference list (raw text; tokenised here as ``reefcap eval`` does).

        ``rescore=False`` leaves CIDEr for a later :meth:`exact` (loading a whole window at once)."""
        image = _Image(tokenize(caption), [tokenize(r) for r in references])
        old = self._images.get(key)
        if old is not None:
            self._account(old, -1)
            self._images[key] = image  # keeps its place in the window
        else:
            self._images[key] = image
            if len(self._images) > self.window:
                gone_key, gone = self._images.popitem(last=False)
                self._account(gone, -1)
                self._stale.remove(gone_key)
            self._stale.append(key)
        self._account(image, +1)
        if rescore:
            self._rescore(key)

    def scores(self) -> dict[str, float | int]:
        """``{"images", "references", "Bleu_4", "CIDEr"}``: the window's image and reference counts, then the
        scores; ``Bleu_4`` absent with no image yet, ``CIDEr`` below ``min_cider_images`` images."""
        out: dict[str, float | int] = {"images": len(self._images), "references": self._references}
        if not self._images:
            return out
        out["Bleu_4"] = bleu_from_stats(self._test_len, self._ref_len, self._correct, self._guess)[3]
        if len(self._images) >= self.min_cider_images:
            out["CIDEr"] = sum(im.cider for im in self._images.values()) / len(self._images)
        return out

    def exact(self) -> dict[str, float | int]:
        """Rescore every image against the current document frequencies (cost: the whole window)."""
        log_refs = math.log(float(len(self._images))) if self._images else 0.0
        for im in self._images.values():
            im.cider = cider_image(im.hyp_counts, im.ref_counts, self._doc_freq, log_refs, N)
        return self.scores()

    def _account(self, image: _Image, sign: int) -> None:
        test_len, ref_len, correct, guess = image.bleu
        self._test_len += sign * test_len
        self._references += sign * len(image.refs)
        self._ref_len += sign * ref_len
        self._correct = [a + sign * b for a, b in zip(self._correct, correct, strict=True)]
        self._guess = [a + sign * b for a, b in zip(self._guess, guess, strict=True)]
        if sign > 0:
            self._doc_freq.update(image.grams)
        else:
            self._doc_freq.subtract(image.grams)
            for gram in image.grams:
                if self._doc_freq[gram] <= 0:
                    del self._doc_freq[gram]

    def _rescore(self, changed: Hashable) -> None:
        """Score the changed image and the ``refresh`` stalest others against the current frequencies."""
        log_refs = math.log(float(len(self._images)))
        keys = [changed]
        self._stale.remove(changed)
        self._stale.append(changed)
        for _ in range(min(self.refresh, len(self._stale) - 1)):
            key = self._stale.popleft()
            self._stale.append(key)
            keys.append(key)
        for key in keys:
            im = self._images[key]
            im.cider = cider_image(im.hyp_counts, im.ref_counts, self._doc_freq, log_refs, N)
