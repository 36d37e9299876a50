"""Text cleaning for corpus preparation: line endings, Unicode NFC, control characters, whitespace, Project
Gutenberg boilerplate, and how a file is cut into documents.

Every function here is pure (str → str), so the Beam pipeline in `corpus.py` and the tests use the same code. The
`iter_*` forms take a file as a sequence of chunks and give what the whole-text forms give, holding one chunk and
one document at a time.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator

DOC_SPLITS = ("file", "paragraph", "line")

# Line breaks of every flavour become "\n" (str.splitlines' set: CR, VT, FF, FS/GS/RS, NEL, LS, PS).
_LINE_BREAKS = re.compile("\r\n|[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
# Control characters (Unicode Cc) other than tab and newline, and the byte-order mark.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f\ufeff]")
# Unicode space separators (Zs) other than the ASCII space.
_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
# The ASCII characters that line-break normalization or control-character removal would change.
_ASCII_SPECIAL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")
_TRAILING_SPACE = re.compile("[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile("\n{3,}")
_PARAGRAPH_BREAK = re.compile("\n[ \t]*\n(?:[ \t]*\n)*")
_BYTES_PARAGRAPH_BREAK = re.compile(rb"\n[ \t\r]*\n(?:[ \t\r]*\n)*")

_GUTENBERG_START = re.compile(
    r"^(?:\*{3}\s*START OF (?:THE |THIS )?PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^(?:\*{3}\s*END OF (?:THE |THIS )?PROJECT GUTENBERG|End of (?:the )?Project Gutenberg)",
                            re.IGNORECASE | re.MULTILINE)


def normalize_line_breaks(text: str) -> str:
    """Every line break (CRLF, CR, NEL, U+2028, ...) as "\\n"."""
    return _LINE_BREAKS.sub("\n", text)


def strip_gutenberg(text: str) -> str:
    """The text between a Project Gutenberg "*** START OF ..." header line and "*** END OF ..." footer line;
    either marker may be missing, and a text without them comes back unchanged. Expects "\\n" line breaks."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text


def clean_text(text: str, gutenberg: bool = False) -> str:
    """One document, cleaned: "\\n" line breaks, (optionally) Gutenberg boilerplate removed, Unicode NFC, control
    characters except tab and newline removed, Unicode spaces as ASCII spaces, trailing spaces of each line
    removed, at most one blank line in a row, no leading or trailing blank space."""
    if gutenberg or not text.isascii() or _ASCII_SPECIAL.search(text):  # else these steps change nothing
        text = normalize_line_breaks(text)
        if gutenberg:
            text = strip_gutenberg(text)
        text = unicodedata.normalize("NFC", text)
        text = _CONTROL.sub("", text)
        text = _SPACES.sub(" ", text)
    if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
        text = _TRAILING_SPACE.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def split_documents(text: str, doc_split: str) -> list[str]:
    """Cuts a file's text ("\\n" line breaks) into documents: the whole file (`file`), blank-line-separated
    paragraphs (`paragraph`) or lines (`line`). Blank pieces are dropped, except that a file is always one
    document."""
    if doc_split == "file":
        return [text]
    pieces = _PARAGRAPH_BREAK.split(text) if doc_split == "paragraph" else text.split("\n")
    return [p for p in pieces if p.strip()]


def split_document_bytes(raw: bytes, doc_split: str) -> list[bytes]:
    """`split_documents` on undecoded bytes, for files that are not valid UTF-8 as a whole: each piece is then
    decoded (or counted as not UTF-8) on its own."""
    if doc_split == "file":
        return [raw]
    pieces = _BYTES_PARAGRAPH_BREAK.split(raw) if doc_split == "paragraph" else raw.split(b"\n")
    return [p for p in pieces if p.strip()]


def iter_normalize_line_breaks(chunks: Iterable[str]) -> Iterator[str]:
    """`normalize_line_breaks` over text arriving in chunks (a "\r" at a chunk's end waits for the next chunk, in
    case it begins with "\n")."""
    held = ""
    for chunk in chunks:
        chunk = held + chunk
        held = "\r" if chunk.endswith("\r") else ""
        if held:
            chunk = chunk[:-1]
        if chunk:
            yield _LINE_BREAKS.sub("\n", chunk)
    if held:
        yield "\n"


def _iter_split(chunks, separator: re.Pattern):
    """The pieces between matches of `separator` over the concatenated chunks. What follows the last match of a
    chunk is carried over together with that match, which may grow with the next chunk."""
    carry = None
    for chunk in chunks:
        buffer = chunk if carry is None else carry + chunk
        start, last = 0, None
        for match in separator.finditer(buffer):
            yield buffer[start:match.start()]
            start, last = match.end(), match.start()
        carry = buffer if last is None else buffer[last:]
    if carry is not None:
        yield from separator.split(carry)


_LINE_BREAK = re.compile("\n")
_BYTES_LINE_BREAK = re.compile(b"\n")


def iter_split_documents(chunks: Iterable[str], doc_split: str) -> Iterator[str]:
    """`split_documents` of the concatenated chunks ("\n" line breaks), as a stream."""
    if doc_split == "file":
        yield "".join(chunks)
        return
    pieces = _iter_split(chunks, _PARAGRAPH_BREAK if doc_split == "paragraph" else _LINE_BREAK)
    yield from (p for p in pieces if p.strip())


def iter_split_document_bytes(chunks: Iterable[bytes], doc_split: str) -> Iterator[bytes]:
    """`split_document_bytes` of the concatenated chunks, as a stream."""
    if doc_split == "file":
        yield b"".join(chunks)
        return
    pieces = _iter_split(chunks, _BYTES_PARAGRAPH_BREAK if doc_split == "paragraph" else _BYTES_LINE_BREAK)
    yield from (p for p in pieces if p.strip())


def normalize_for_dedup(text: str) -> str:
    """The form two documents must share to be exact duplicates, and the one MinHash shingles: case-folded, with
    every run of whitespace as one space."""
    return " ".join(text.casefold().split())
