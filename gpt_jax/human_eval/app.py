"""The rating web app (standard library `http.server`): `GET /` shows the next pair a rater has not rated, the two
outputs side by side as A (left) and B (right); `POST /rate` takes the form fields pair_id, choice (a | b | tie),
comment, rater and token; `GET /report` shows the results so far.

Every form carries a token bound to its pair (a nonce and its MAC), so a forged or mismatched post is refused and a
double submit records one rating. After a post the browser is redirected (303) to the next pair, so reloading never
posts again. Every request opens its own SQLite connection; each write is one transaction.
"""

from __future__ import annotations

import html
import sqlite3
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gpt_jax.human_eval import stats, store

MAX_BODY = 64 * 1024
MAX_COMMENT = 4000
MAX_RATER = 100
FIELDS = {"pair_id", "choice", "comment", "rater", "token"}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1rem 2rem; color: #1d1d1f;
       background: #fafafa; }
header { display: flex; justify-content: space-between; align-items: baseline; border-bottom: 1px solid #ddd; }
h1 { font-size: 1.3rem; margin: .5rem 0; }
.muted { color: #666; font-size: .9rem; }
.prompt { background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: .8rem 1rem; margin: 1rem 0; }
.outputs { display: flex; gap: 1rem; }
.output { flex: 1; min-width: 0; background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: 0 1rem 1rem; }
.output h2 { font-size: 1rem; margin: .8rem 0 .4rem; }
pre { white-space: pre-wrap; word-wrap: break-word; font-family: ui-monospace, monospace; font-size: .9rem;
      margin: 0; }
.choices { display: flex; gap: 1rem; justify-content: center; margin: 1.2rem 0 .6rem; }
button { font-size: 1rem; padding: .6rem 1.6rem; border-radius: 6px; border: 1px solid #888; background: #fff;
         cursor: pointer; }
button:hover { background: #e8f0fe; }
textarea { width: 100%; box-sizing: border-box; font: inherit; min-height: 3.5rem; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: .3rem .7rem; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
.error { color: #a00; }
"""


def _page(title: str, body: str) -> bytes:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{_STYLE}</style></head>"
            f"<body>{body}</body></html>").encode()


def _shown(output: str) -> str:
    """An output as HTML; an empty one says so rather than showing a blank box."""
    return html.escape(output) if output.strip() else "<span class=muted>(empty output)</span>"


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class App:
    """The evaluation behind the web pages: a database path and its form-token key."""

    def __init__(self, db_path: str):
        self.db_path = db_path
        conn = store.connect(db_path)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            self.key = store.secret(conn)
        finally:
            conn.close()

    def connect(self) -> sqlite3.Connection:
        return store.connect(self.db_path)

    # pages

    def rate_page(self, rater: str) -> bytes:
        conn = self.connect()
        try:
            pair = store.next_pair(conn, rater)
            rated, total = store.progress(conn, rater)
        finally:
            conn.close()
        who = f" · rater {html.escape(rater)}" if rater else ""
        header = (f"<header><h1>Which output is better?</h1><span class=muted id=progress>{rated} of {total} pairs "
                  f"rated{who} · <a href='/report'>results</a></span></header>")
        if pair is None:
            return _page("All rated", header + f"<p id=done>All {total} pairs are rated. Thank you!</p>")
        token = store.make_token(self.key, pair.id)
        body = f"""{header}
<form method=post action="/rate" id=rate-form>
<div class=prompt><div class=muted>Prompt</div><pre id=prompt>{html.escape(pair.prompt)}</pre></div>
<div class=outputs>
  <div class=output><h2>A</h2><pre id=output-a>{_shown(pair.left_output)}</pre></div>
  <div class=output><h2>B</h2><pre id=output-b>{_shown(pair.right_output)}</pre></div>
</div>
<div class=choices>
  <button type=submit name=choice value=a id=choose-a>A is better</button>
  <button type=submit name=choice value=tie id=choose-tie>Tie</button>
  <button type=submit name=choice value=b id=choose-b>B is better</button>
</div>
<label class=muted for=comment>Comment (optional)</label>
<textarea name=comment id=comment maxlength={MAX_COMMENT}></textarea>
<input type=hidden name=pair_id value="{pair.id}">
<input type=hidden name=rater value="{html.escape(rater)}">
<input type=hidden name=token value="{html.escape(token)}">
</form>"""
        return _page(f"Pair {pair.id}", body)

    def report_page(self) -> bytes:
        conn = self.connect()
        try:
            summary = stats.summarize(store.outcomes(conn))
        finally:
            conn.close()
        tables = "".join(
            "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            + "</table>" for headers, rows in stats.report_tables(summary)) if summary["pairs"] else ""
        return _page("Results", f"<header><h1>Results</h1><a href='/'>rate</a></header>"
                                f"<p id=summary>{summary['ratings']} rating(s).</p>{tables}"
                                f"<p class=muted>{html.escape(stats.NOTE)}</p>")

    # the form post

    def rate(self, content_type: str, body: bytes) -> str:
        """Validates a posted rating and records it; returns the rater (for the redirect). Raises BadRequest."""
        if content_type.split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
            raise BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the form must be application/x-www-form-urlencoded")
        try:
            text = body.decode("utf-8")
            fields = urllib.parse.parse_qs(text, keep_blank_values=True, strict_parsing=bool(text),
                                           max_num_fields=len(FIELDS) + 1, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "the form is not valid URL-encoded UTF-8") from None
        unknown = set(fields) - FIELDS
        if unknown:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"unknown form field {sorted(unknown)[0]!r}")
        if any(len(v) > 1 for v in fields.values()):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "a form field is given more than once")
        form = {k: v[0] for k, v in fields.items()}
        for name in ("pair_id", "choice", "token"):
            if not form.get(name):
                raise BadRequest(HTTPStatus.BAD_REQUEST, f"the form field {name!r} is missing")
        pair_id_text, choice, token = form["pair_id"], form["choice"], form["token"]
        comment, rater = form.get("comment", "").strip(), form.get("rater", "")
        if not (pair_id_text.isascii() and pair_id_text.isdigit() and len(pair_id_text) <= 18):
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"pair_id {pair_id_text[:20]!r} is not a pair number")
        if choice not in store.CHOICES:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"choice {choice[:20]!r} is not one of a, b, tie")
        if len(comment) > MAX_COMMENT or len(rater) > MAX_RATER or "\x00" in comment + rater:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "the comment or rater name is too long or holds NUL")
        pair_id = int(pair_id_text)
        if not store.check_token(self.key, pair_id, token):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "the form token does not belong to this pair; reload the page")
        conn = self.connect()
        try:
            store.add_rating(conn, pair_id, choice, comment, rater, token)
        except KeyError:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"there is no pair {pair_id}") from None
        finally:
            conn.close()
        return rater


def _handler(app: App):
    class Handler(BaseHTTPRequestHandler):
        server_version = "gpt_jax-human-eval"
        timeout = 30  # seconds a client may take to send its request (a stalled one frees its thread)

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

        def _send(self, status: HTTPStatus, body: bytes = b"", location: str | None = None):
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                                        "form-action 'self'")
            if location:
                self.send_header("Location", location)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: HTTPStatus, message: str):
            self._send(status, _page("Error", f"<h1 class=error>{status.value} {status.phrase}</h1>"
                                              f"<p id=error>{html.escape(message)}</p><p><a href='/'>back</a></p>"))

        def do_GET(self):  # noqa: N802 - http.server's name
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            if url.path == "/":
                rater = query.get("rater", [""])[0][:MAX_RATER]
                self._send(HTTPStatus.OK, app.rate_page(rater))
            elif url.path == "/report":
                self._send(HTTPStatus.OK, app.report_page())
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no page {url.path}")

        do_HEAD = do_GET

        def do_POST(self):  # noqa: N802
            if urllib.parse.urlsplit(self.path).path != "/rate":
                return self._error(HTTPStatus.NOT_FOUND, "post ratings to /rate")
            length_text = self.headers.get("Content-Length", "")
            if not length_text.isdigit():
                return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            length = int(length_text)
            if length > MAX_BODY:
                self.close_connection = True
                return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the form is over {MAX_BODY} bytes")
            body = self.rfile.read(length)
            try:
                rater = app.rate(self.headers.get("Content-Type", ""), body)
            except BadRequest as e:
                return self._error(e.status, str(e))
            location = "/" + (f"?{urllib.parse.urlencode({'rater': rater})}" if rater else "")
            self._send(HTTPStatus.SEE_OTHER, b"", location)

    return Handler


def make_server(db_path: str, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for the evaluation in `db_path` (port 0 picks a free port); call serve_forever()."""
    server = ThreadingHTTPServer((host, port), _handler(App(db_path)))
    server.daemon_threads = True
    return server


def serve_in_thread(db_path: str, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Starts the server in a daemon thread; returns it and its base URL (stop with server.shutdown())."""
    server = make_server(db_path, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"
