"""Reference captions from users, kept durably in SQLite (WAL) or PostgreSQL, scored and exported for training.

Every captioned image is stored with its caption (``served``), newest ``retain`` kept, plus any image that
has feedback (those are never pruned). ``POST /v1/feedback`` adds references for a served request id: each
reference once per image, at most ``max_references`` per image. Rolling BLEU-4 and CIDEr per model
(:mod:`reefcap.models.metrics`, the numbers ``reefcap eval`` reports) cover the ``window`` images that most
recently got their first references, kept up to date incrementally (:mod:`reefcap.models.policy.rolling`;
CIDEr only once 10 images have references, with the image and reference counts they come from);
``export`` writes the images and references as a COCO-captions training set. A database that cannot be
opened or written raises :class:`FeedbackUnavailableError` when the store opens.

Several processes may share one database (the workers of ``reefcap serve --workers N`` share a SQLite file;
servers on several machines, or Ray Serve replicas, a PostgreSQL database): references are read back by id,
so the rolling scores of every process follow the posts any of them took, and the served model's generation
(:meth:`FeedbackStore.publish_serving`) lives beside them. The SQL itself is :mod:`.store_sql`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from PIL import Image

from reefcap.models.data.records import SPLITS, stable_split
from reefcap.models.errors import ReefcapError
from reefcap.models.policy.rolling import RollingScores

from .store_sql import PRUNE, PUBLISH, READ_SERVING, SERVED_UPSERT, DatabaseError, is_dsn, open_database, redacted

# Served images are stored as sent when small, else re-encoded: training pipelines resize far below this.
MAX_STORED_BYTES = 1 << 20
MAX_STORED_SIDE = 1024
WITH_REFERENCES = (
    "SELECT s.request_id, s.idx, s.model, s.version, s.caption, s.image, s.ext, s.width, s.height, f.reference, f.id "
    "FROM served s JOIN feedback f ON f.request_id = s.request_id AND f.idx = s.idx ORDER BY f.id"
)
# Every reference, in id order, of each served image that got one after a given feedback id.
CHANGED_IMAGES = (
    "SELECT s.request_id, s.idx, s.model, s.caption, f.reference FROM served s JOIN feedback f "
    "ON f.request_id = s.request_id AND f.idx = s.idx WHERE EXISTS (SELECT 1 FROM feedback n WHERE n.id > ? "
    "AND n.request_id = s.request_id AND n.idx = s.idx) ORDER BY f.id"
)
log = logging.getLogger("reefcap.server")


class UnknownRequestError(ReefcapError):
    """Feedback named a request id (or image index) this server never served or no longer keeps."""

    code = "unknown_request"


class TooManyReferencesError(ReefcapError):
    """The post would take an image past the references it may keep (409)."""

    code = "too_many_references"


class FeedbackUnavailableError(ReefcapError):
    """The feedback database cannot be opened or written (a one-line error at start, 503 later)."""

    code = "feedback_unavailable"


def stored_image(data: bytes, image: Image.Image) -> tuple[bytes, str]:
    """The bytes to keep for a served image and their file extension."""
    # The decoded image still knows its format unless a mode conversion replaced it: only then read the header again.
    fmt = image.format or (Image.open(io.BytesIO(data)).format if data else None)
    fmt = (fmt or "").upper()
    if data and len(data) <= MAX_STORED_BYTES and fmt in ("JPEG", "PNG", "WEBP"):
        return data, {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    small = image.copy()
    small.thumbnail((MAX_STORED_SIDE, MAX_STORED_SIDE))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=92)
    return buf.getvalue(), "jpg"


class FeedbackStore:
    """Thread-safe store. Served images are written behind: ``record_served`` only queues them and one writer
    thread commits everything queued in one transaction (group commit), so a busy server pays one commit per
    burst instead of one per request; a caller that must know the rows are committed (another process may be
    asked for their feedback next) waits on the future it returns. Reads flush the queue first, and ``close``
    drains it."""

    def __init__(
        self, where: str | Path, retain: int = 20_000, max_pending_bytes: int = 64 << 20, max_references: int = 20
    ) -> None:
        """Open (creating if needed) the database at ``where``, a SQLite file or a ``postgresql://`` DSN;
        :class:`FeedbackUnavailableError` (one line) when it cannot be opened or written: a server that would
        drop every record must not start as ready."""
        self.path = Path(where) if not is_dsn(where) else None
        self.where = redacted(str(where)) if is_dsn(where) else str(where)
        self.retain = retain
        self.max_pending_bytes = max_pending_bytes
        self.max_references = max_references  # per served image
        self.database = _open_writable(where)
        self.shared_kind = self.database.kind
        self._lock = self.database.lock  # the connection
        self._db = getattr(self.database, "raw", None)  # the sqlite3 connection, where it is one
        self._rolling: dict[str, RollingScores] = {}
        self._rolling_lock = threading.Lock()
        self._seen: int | None = None  # the highest feedback id the rolling scores have taken in
        self._models: set[str] = set()
        self._inserts = 0
        self._pending: list[tuple] = []
        self._pending_bytes = 0
        self._pending_done: Future | None = None
        self._pending_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self.dropped = 0  # served rows not kept because the writer fell too far behind
        self._writer = threading.Thread(target=self._write_loop, name="reefcap-feedback-writer", daemon=True)
        self._writer.start()

    def close(self) -> None:
        """Write everything queued, stop the writer and close the database."""
        self._closed = True
        self._wake.set()
        self._writer.join(timeout=30)
        self.flush()
        with self._lock:
            self.database.close()

    @contextlib.contextmanager
    def _unavailable(self) -> Iterator[None]:
        try:
            yield
        except DatabaseError as exc:
            raise FeedbackUnavailableError(f"feedback database {self.where}: {exc}") from None

    def record_served(self, request_id: str, rows: Sequence[dict[str, Any]]) -> Future | None:
        """Queue served images for the writer (returns at once; safe on the event loop): dicts of idx, model,
        version, caption, fallback_reason, image, ext, width, height. The future completes when they are
        committed (None: not kept, the writer is too far behind)."""
        now = time.time()
        batch = [
            (request_id, r["idx"], r["model"], r["version"], r["caption"], r.get("fallback_reason"))
            + (r["image"], r["ext"], r["width"], r["height"], now)
            for r in rows
        ]
        size = sum(len(r["image"]) for r in rows)
        with self._pending_lock:
            if self._pending_bytes + size > self.max_pending_bytes:  # the disk cannot keep up: keep serving
                self.dropped += len(batch)
                log.warning("feedback writer is behind: not keeping %d served images of %s", len(batch), request_id)
                return None
            self._pending.extend(batch)
            self._pending_bytes += size
            done = self._pending_done = self._pending_done or Future()
        self._wake.set()
        return done

    def flush(self) -> None:
        """Commit every queued served image now (reads call this, so they see what was served)."""
        # Taken under the connection lock: a reader that finds the queue empty cannot overtake rows that
        # another thread took from the queue and has not committed yet.
        with self._lock:
            with self._pending_lock:
                batch, self._pending, self._pending_bytes = self._pending, [], 0
                done, self._pending_done = self._pending_done, None
            if not batch:
                return
            try:
                with self._unavailable(), self.database.transaction(write=True):
                    self.database.executemany(SERVED_UPSERT, batch)
                    self._inserts += len(batch)
                    if self._inserts >= 256:
                        self._inserts = 0
                        self.database.execute(PRUNE, (self.retain,))
            except BaseException as exc:
                if done is not None and not done.cancelled():
                    done.set_exception(exc)
                raise
            if done is not None and not done.cancelled():
                done.set_result(len(batch))

    def _write_loop(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:  # a full disk must not stop the server; the captions were already served
                log.error("could not record served images for feedback: %s", exc)

    def add(self, request_id: str, idx: int, references: Sequence[str]) -> dict[str, Any]:
        """Store references for one served image: ``{"model", "stored", "references"}`` (new ones stored, the
        image's total). A reference the image already has is not stored again, so a retried post changes
        nothing; past ``max_references`` per image the whole post is refused (:class:`TooManyReferencesError`).
        Committed before it returns: an answered post is never lost."""
        if not 0 <= idx < 2**63:  # the databases' integers
            raise UnknownRequestError(f"no served image {idx} for request id {request_id!r}")
        with self._unavailable():
            self.flush()
            # Exclusive: two processes posting for one image cannot both pass the per-image limit.
            with self._lock, self.database.transaction(exclusive=True):
                model, refs, new = self._insert(request_id, idx, references)
        return {"model": model, "stored": len(new), "references": len(refs)}

    def _insert(self, request_id: str, idx: int, references: Sequence[str]) -> tuple[str, list[str], list[str]]:
        db = self.database
        row = db.execute("SELECT model FROM served WHERE request_id = ? AND idx = ?", (request_id, idx))
        if not row:
            raise UnknownRequestError(f"no served image {idx} for request id {request_id!r}")
        sql = "SELECT reference FROM feedback WHERE request_id = ? AND idx = ? ORDER BY id"
        have = [r for (r,) in db.execute(sql, (request_id, idx))]
        new = [r for r in dict.fromkeys(references) if r not in set(have)]
        if len(have) + len(new) > self.max_references:
            raise TooManyReferencesError(
                f"image {idx} of request {request_id!r} has {len(have)} references; {len(new)} more would pass "
                f"the limit of {self.max_references} per image (REEFCAP_FEEDBACK_MAX_REFERENCES)"
            )
        now = time.time()
        db.executemany(
            "INSERT INTO feedback (request_id, idx, reference, created) VALUES (?,?,?,?)",
            [(request_id, idx, ref, now) for ref in new],
        )
        return row[0][0], have + new, new

    def pairs(self, model: str, window: int) -> list[tuple[tuple[str, int], str, list[str]]]:
        """((request id, index), served caption, references) of the ``window`` images of ``model`` that most
        recently got their first references, oldest first."""
        with self._unavailable():
            self.flush()
            with self._lock:
                rows = self.database.execute(
                    "WITH win AS (SELECT f.request_id, f.idx, min(f.id) AS first FROM feedback f JOIN served s "
                    "ON s.request_id = f.request_id AND s.idx = f.idx WHERE s.model = ? "
                    "GROUP BY f.request_id, f.idx ORDER BY first DESC LIMIT ?) "
                    "SELECT w.request_id, w.idx, s.caption, f.reference FROM win w "
                    "JOIN served s ON s.request_id = w.request_id AND s.idx = w.idx "
                    "JOIN feedback f ON f.request_id = w.request_id AND f.idx = w.idx ORDER BY w.first, f.id",
                    (model, window),
                )
        grouped: dict[tuple[str, int], tuple[str, list[str]]] = {}
        for rid, idx, caption, ref in rows:
            grouped.setdefault((rid, idx), (caption, []))[1].append(ref)
        return [(key, caption, refs) for key, (caption, refs) in grouped.items()]

    def rolling_scores(self, model: str, window: int) -> dict[str, float | int]:
        """Rolling BLEU-4 and CIDEr of the model's served captions against their references (the library's
        caption metrics, as ``reefcap eval`` computes them), kept up to date incrementally with every reference
        any process sharing the database stored (:class:`~reefcap.models.policy.rolling.RollingScores`); read
        from the database on first use.

        ``{"images", "references", "Bleu_4", "CIDEr"}``: CIDEr is absent until
        :data:`~reefcap.models.policy.rolling.MIN_CIDER_IMAGES` images have references (it is degenerate over
        fewer), Bleu_4 until one has."""
        with self._rolling_lock:
            self._catch_up()
            rolling = self._rolling.get(model)
            if rolling is None or rolling.window != window:
                rolling = RollingScores(window)
                for key, caption, refs in self.pairs(model, window):
                    rolling.update(key, caption, refs, rescore=False)
                self._rolling[model] = rolling
                return rolling.exact()
            return rolling.scores()

    def _catch_up(self) -> None:
        """Take in the references stored since the last look, by this process or any other (under the rolling
        lock). Ids follow commit order (posts are exclusive transactions), so none is skipped."""
        with self._unavailable(), self._lock:
            if self._seen is None:
                top = self.database.execute("SELECT coalesce(max(id), 0) FROM feedback")[0][0]
                joined = "FROM served s JOIN feedback f ON f.request_id = s.request_id AND f.idx = s.idx"
                self._models = {m for (m,) in self.database.execute(f"SELECT DISTINCT s.model {joined}")}
                self._seen = top
                return
            sql = "SELECT id, request_id, idx FROM feedback WHERE id > ? ORDER BY id"
            rows = self.database.execute(sql, (self._seen,))
            if not rows:
                return
            since, self._seen = self._seen, rows[-1][0]
            # Every reference of the changed images in one query, not one query per image.
            found: dict[tuple[str, int], tuple[str, str, list[str]]] = {}
            for rid, idx, model, caption, ref in self.database.execute(CHANGED_IMAGES, (since,)):
                found.setdefault((rid, idx), (model, caption, []))[2].append(ref)
            # In the order of their first new reference; an image whose first one committed after the ids above
            # were read waits for the next look.
            keys = dict.fromkeys((rid, idx) for _, rid, idx in rows)
            changed = [(key, *found[key]) for key in keys if key in found]
        for key, model, caption, refs in changed:
            self._models.add(model)
            rolling = self._rolling.get(model)
            if rolling is not None:
                rolling.update(key, caption, refs)

    def models_with_feedback(self) -> list[str]:
        """The models whose served captions have references, in any process sharing the database."""
        with self._rolling_lock:
            self._catch_up()
            return sorted(self._models)

    # ---- the served model's generation (shared by every process on the database) --------------------

    def serving_record(self, configured: str) -> dict[str, Any] | None:
        """The latest accepted reload of servers configured with primary ``configured``: ``{"generation",
        "target", "manifest", "name", "version", "updated"}``, or None before the first."""
        with self._unavailable(), self._lock:
            rows = self.database.execute(READ_SERVING, (configured,))
        keys = ("generation", "target", "manifest", "name", "version", "updated")
        return dict(zip(keys, rows[0], strict=True)) if rows else None

    def publish_serving(self, configured: str, target: str, manifest: str | None, name: str, version: str) -> int:
        """Record that ``target`` (manifest SHA-256 ``manifest``) now serves as ``configured``'s primary; the new
        generation number."""
        with self._unavailable(), self._lock, self.database.transaction(write=True):
            rows = self.database.execute(PUBLISH, (configured, target, manifest, name, version, time.time()))
        return int(rows[0][0])

    # ---- export -------------------------------------------------------------------------------

    def _with_references(self) -> list[tuple]:
        """Every served image with feedback: (request_id, idx, model, version, caption, image, ext, w, h, refs),
        in the order of their first reference."""
        with self._unavailable():
            self.flush()
            with self._lock:
                rows = self.database.execute(WITH_REFERENCES)
        grouped: dict[tuple[str, int], list] = {}
        for row in rows:
            grouped.setdefault((row[0], row[1]), [*row[:9], []])[9].append(row[9])
        return [(*g[:5], bytes(g[5]), *g[6:9], tuple(g[9])) for g in grouped.values()]

    def split_items(self, split: str) -> list[tuple[bytes, tuple[str, ...]]]:
        """(image bytes, references) of the images with feedback in ``split``, the split ``export`` puts them
        in (the quality gate scores candidates on ``test``: images no export ever trains on)."""
        return [(r[5], r[9]) for r in self._with_references() if image_split(r[5]) == split]

    def export(self, out: str | Path) -> dict[str, Any]:
        """Write every image with references as COCO-captions sets: ``out/{train,val,test}.json`` split by image
        (:func:`image_split`: the same image always lands in the same split, whenever it is exported),
        ``out/captions.json`` with all of them, and ``out/images/``."""
        from reefcap.models.data.records import CaptionRecord, write_coco

        out = Path(out)
        (out / "images").mkdir(parents=True, exist_ok=True)
        records = []
        for n, (rid, idx, model, version, caption, blob, ext, w, h, refs) in enumerate(self._with_references(), 1):
            path = out / "images" / f"{rid}-{idx}.{ext}"
            path.write_bytes(blob)
            meta = {"request_id": rid, "index": idx, "model": model, "version": version, "served_caption": caption}
            meta.update(width=w, height=h, split=image_split(blob))
            records.append(CaptionRecord(n, path.resolve(), refs, meta))
        info = {"description": "reefcap feedback export"}
        write_coco(records, out / "captions.json", info=info)
        splits = {}
        for split in SPLITS:
            chosen = [r for r in records if r.metadata["split"] == split]
            write_coco(chosen, out / f"{split}.json", info={**info, "split": split})
            splits[split] = len(chosen)
        annotations = sum(len(r.captions) for r in records)
        return {"images": len(records), "annotations": annotations, "splits": splits, "out": str(out)}


def image_split(image: bytes) -> str:
    """The export split of a served image, from the hash of its bytes (70/15/15 on average): a photo sent
    twice lands in one split, so a held-out image never leaks into training through a second request."""
    return stable_split(hashlib.sha256(image).hexdigest())


def _open_writable(where: str | Path):
    """The database at ``where`` with its schema, after a write probe; one-line error when that fails."""
    try:
        return open_database(where)
    except (OSError, DatabaseError) as exc:
        if is_dsn(where):
            hint = "check REEFCAP_FEEDBACK_DSN (and that the server is up and the user may create tables)"
            message = f"feedback database {redacted(str(where))} cannot be used ({exc}); {hint}"
            raise FeedbackUnavailableError(message) from None
        raise FeedbackUnavailableError(
            f"feedback database {where} cannot be opened for writing ({exc}); set --feedback-db or "
            "REEFCAP_FEEDBACK_DB to a writable file"
        ) from None


def open_store_readonly_check(path: str | Path) -> str | Path:
    """The database to export from, or a clear error when a SQLite file does not exist (export never creates an
    empty one); a DSN is returned as given."""
    if is_dsn(path):
        return path
    p = Path(path)
    if not p.is_file():
        raise ReefcapError(f"{p}: no feedback database (set --db or REEFCAP_FEEDBACK_DB)")
    return p
