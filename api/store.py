"""Stored chat completions (``store: true``), kept in SQLite through the standard library.

``tokenmill serve --store PATH`` opens (or creates) the database at PATH; the chat endpoint saves
each completion asked to be stored with its request messages and metadata, and these routes
serve them as OpenAI does:

- ``GET /v1/chat/completions`` (``after``, ``limit``, ``order``, ``model``, ``metadata[key]=value``)
- ``GET /v1/chat/completions/{id}`` and ``POST /v1/chat/completions/{id}`` (``{"metadata": ...}``)
- ``DELETE /v1/chat/completions/{id}``
- ``GET /v1/chat/completions/{id}/messages`` (``after``, ``limit``, ``order``)

Without ``--store`` the routes answer 400 ``store_disabled`` and a request with ``store: true``
is refused the same way (not accepted and dropped: the client would look for it later).

SQLite calls block, so they run on one worker thread of their own (which also serializes
them; the connection is used by that thread only), never on the event loop.
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request

from tokenmill.api.errors import APIError, bad_request

#: OpenAI's limits on ``metadata``: 16 pairs, keys up to 64 characters, values up to 512.
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
#: Page sizes: OpenAI's default and largest ``limit``.
DEFAULT_LIMIT, MAX_LIMIT = 20, 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created INTEGER NOT NULL,
    model TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metadata (
    seq INTEGER NOT NULL REFERENCES completions(seq) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (seq, key)
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER NOT NULL REFERENCES completions(seq) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (seq, idx)
);
CREATE INDEX IF NOT EXISTS metadata_kv ON metadata(key, value);
"""


def check_metadata(metadata, param: str = "metadata") -> dict[str, str] | None:
    """``metadata`` as OpenAI bounds it (string keys and values), else a 400 naming ``param``."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise bad_request(f"{param} must be an object of string keys and values.", param)
    if len(metadata) > MAX_METADATA_PAIRS:
        raise bad_request(f"{param} holds {len(metadata)} pairs; at most {MAX_METADATA_PAIRS} are allowed.", param)
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise bad_request(f"{param}[{k[:64]!r}] must be a string, got {type(v).__name__}.", param)
        if len(k) > MAX_METADATA_KEY:
            raise bad_request(f"{param} key {k[:64]!r}... is longer than {MAX_METADATA_KEY} characters.", param)
        if len(v) > MAX_METADATA_VALUE:
            raise bad_request(f"{param}[{k!r}] is longer than {MAX_METADATA_VALUE} characters.", param)
    return dict(metadata)


def _not_found(cid: str) -> APIError:
    return APIError(404, f"No stored chat completion found with id '{cid[:200]}'.", None, "not_found")


class CompletionStore:
    """The SQLite database of stored chat completions; every method is a coroutine run off the loop."""

    def __init__(self, path: str):
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-store")
        self._db: sqlite3.Connection | None = None
        try:  # fail at startup on a bad path, not on the first request
            self._pool.submit(self._open).result()
        except sqlite3.Error as exc:
            self._pool.shutdown()
            raise ValueError(f"--store {path}: cannot open the SQLite database: {exc}") from None

    def _open(self) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False)
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(_SCHEMA)
        db.commit()
        self._db = db

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        def _close():
            if self._db is not None:
                self._db.close()
                self._db = None
        self._pool.submit(_close).result()
        self._pool.shutdown()

    # -- writes --------------------------------------------------------------------------------
    async def save(self, completion: dict, messages: list[dict], metadata: dict | None) -> None:
        """Store a chat completion object, the request's messages and its metadata."""
        await self._run(self._save, completion, messages, metadata or {})

    def _save(self, completion: dict, messages: list[dict], metadata: dict) -> None:
        db = self._db
        with db:
            cur = db.execute("INSERT INTO completions (id, created, model, body) VALUES (?, ?, ?, ?)",
                             (completion["id"], completion["created"], completion["model"], json.dumps(completion)))
            seq = cur.lastrowid
            db.executemany("INSERT INTO metadata (seq, key, value) VALUES (?, ?, ?)",
                           [(seq, k, v) for k, v in metadata.items()])
            db.executemany("INSERT INTO messages (seq, idx, body) VALUES (?, ?, ?)",
                           [(seq, i, json.dumps(m)) for i, m in enumerate(messages)])

    async def update_metadata(self, cid: str, metadata: dict | None) -> dict | None:
        """Replace a completion's metadata; returns the updated completion (None if unknown)."""
        return await self._run(self._update, cid, metadata or {})

    def _update(self, cid: str, metadata: dict) -> dict | None:
        db = self._db
        with db:
            seq = self._seq(cid)
            if seq is None:
                return None
            db.execute("DELETE FROM metadata WHERE seq = ?", (seq,))
            db.executemany("INSERT INTO metadata (seq, key, value) VALUES (?, ?, ?)",
                           [(seq, k, v) for k, v in metadata.items()])
        return self._get(cid)

    async def delete(self, cid: str) -> bool:
        return await self._run(self._delete, cid)

    def _delete(self, cid: str) -> bool:
        with self._db:
            return self._db.execute("DELETE FROM completions WHERE id = ?", (cid,)).rowcount > 0

    # -- reads ---------------------------------------------------------------------------------
    def _seq(self, cid: str) -> int | None:
        row = self._db.execute("SELECT seq FROM completions WHERE id = ?", (cid,)).fetchone()
        return row[0] if row else None

    def _metadata(self, seq: int) -> dict:
        return dict(self._db.execute("SELECT key, value FROM metadata WHERE seq = ? ORDER BY key", (seq,)))

    async def get(self, cid: str) -> dict | None:
        return await self._run(self._get, cid)

    def _get(self, cid: str) -> dict | None:
        row = self._db.execute("SELECT seq, body FROM completions WHERE id = ?", (cid,)).fetchone()
        if row is None:
            return None
        return {**json.loads(row[1]), "metadata": self._metadata(row[0])}

    async def list(self, after: str | None, limit: int, order: str, model: str | None,
                   metadata: dict[str, str]) -> tuple[list[dict], bool] | None:
        """One page of completions and whether more follow; None when ``after`` is unknown."""
        return await self._run(self._list, after, limit, order, model, metadata)

    def _list(self, after, limit, order, model, metadata):
        where, args = [], []
        if after is not None:
            seq = self._seq(after)
            if seq is None:
                return None
            where.append("c.seq > ?" if order == "asc" else "c.seq < ?")
            args.append(seq)
        if model is not None:
            where.append("c.model = ?")
            args.append(model)
        for k, v in metadata.items():
            where.append("EXISTS (SELECT 1 FROM metadata m WHERE m.seq = c.seq AND m.key = ? AND m.value = ?)")
            args += [k, v]
        sql = (f"SELECT c.seq, c.body FROM completions c {'WHERE ' + ' AND '.join(where) if where else ''} "
               f"ORDER BY c.seq {'ASC' if order == 'asc' else 'DESC'} LIMIT ?")
        rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        page = [{**json.loads(body), "metadata": self._metadata(seq)} for seq, body in rows[:limit]]
        return page, len(rows) > limit

    async def messages(self, cid: str, after: str | None, limit: int, order: str):
        """One page of a completion's request messages and whether more follow; None if unknown."""
        return await self._run(self._messages, cid, after, limit, order)

    def _messages(self, cid, after, limit, order):
        seq = self._seq(cid)
        if seq is None:
            return None
        where, args = "seq = ?", [seq]
        if after is not None:
            prefix = f"{cid}-"
            if not after.startswith(prefix) or not after[len(prefix):].isdigit():
                return [], False
            where += " AND idx > ?" if order == "asc" else " AND idx < ?"
            args.append(int(after[len(prefix):]))
        rows = self._db.execute(f"SELECT idx, body FROM messages WHERE {where} "
                                f"ORDER BY idx {'ASC' if order == 'asc' else 'DESC'} LIMIT ?",
                                (*args, limit + 1)).fetchall()
        page = [{"id": f"{cid}-{idx}", **json.loads(body)} for idx, body in rows[:limit]]
        return page, len(rows) > limit


def stored_message(message: dict) -> dict:
    """A request message as the messages list returns it: text ``content``, and ``content_parts``
    holding the parts when the message gave a list of them (else null)."""
    content = message.get("content")
    out = {k: v for k, v in message.items() if k not in ("content",)}
    if isinstance(content, list):
        out["content"] = "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        out["content_parts"] = content
    else:
        out["content"] = content
        out["content_parts"] = None
    return out


def _page(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


def _paging(request: Request) -> tuple[str | None, int, str]:
    q = request.query_params
    after = q.get("after") or None
    raw = q.get("limit")
    try:
        limit = DEFAULT_LIMIT if raw is None else int(raw)
    except ValueError:
        raise bad_request(f"limit must be an integer, got {raw[:40]!r}.", "limit") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise bad_request(f"limit must be in [1, {MAX_LIMIT}], got {limit}.", "limit")
    order = q.get("order", "asc")
    if order not in ("asc", "desc"):
        raise bad_request(f"order must be 'asc' or 'desc', got {order[:40]!r}.", "order")
    return after, limit, order


def _metadata_filter(request: Request) -> dict[str, str]:
    """``metadata[key]=value`` query parameters (how the SDK encodes the ``metadata`` filter)."""
    out = {}
    for k, v in request.query_params.multi_items():
        if k.startswith("metadata[") and k.endswith("]"):
            out[k[len("metadata["):-1]] = v
        elif k == "metadata":
            raise bad_request("filter by metadata as metadata[KEY]=VALUE query parameters.", "metadata")
    return out


def add_store_routes(app: FastAPI, store: CompletionStore | None) -> None:
    """Register the stored-completion routes (answering ``store_disabled`` when ``store`` is None)."""

    def need() -> CompletionStore:
        if store is None:
            raise disabled()
        return store

    @app.get("/v1/chat/completions")
    async def list_completions(request: Request):
        s = need()
        after, limit, order = _paging(request)
        model = request.query_params.get("model") or None
        got = await s.list(after, limit, order, model, _metadata_filter(request))
        if got is None:
            raise _not_found(after)
        return _page(*got)

    @app.get("/v1/chat/completions/{cid}")
    async def get_completion(cid: str):
        got = await need().get(cid)
        if got is None:
            raise _not_found(cid)
        return got

    @app.post("/v1/chat/completions/{cid}")
    async def update_completion(cid: str, request: Request):
        s = need()
        try:
            body = await request.json()
        except ValueError:
            raise bad_request("the request body is not valid JSON.") from None
        if not isinstance(body, dict) or "metadata" not in body:
            raise bad_request("give the new metadata: {\"metadata\": {...}} (null clears it).", "metadata")
        unknown = sorted(set(body) - {"metadata"})
        if unknown:
            raise bad_request(f"only metadata can be updated, got {', '.join(map(repr, unknown))[:200]}.", unknown[0])
        got = await s.update_metadata(cid, check_metadata(body["metadata"]))
        if got is None:
            raise _not_found(cid)
        return got

    @app.delete("/v1/chat/completions/{cid}")
    async def delete_completion(cid: str):
        if not await need().delete(cid):
            raise _not_found(cid)
        return {"object": "chat.completion.deleted", "id": cid, "deleted": True}

    @app.get("/v1/chat/completions/{cid}/messages")
    async def completion_messages(cid: str, request: Request):
        s = need()
        after, limit, order = _paging(request)
        got = await s.messages(cid, after, limit, order)
        if got is None:
            raise _not_found(cid)
        return _page(*got)


def disabled() -> APIError:
    return APIError(400, "Storing chat completions is off on this server (start it with --store PATH to keep "
                         "completions sent with store: true).", "store", "store_disabled")
