"""Text cleaning for corpus preparation: line endings, Unicode NFC, control characters, whitespace, Project
Gutenberg boilerplate, and how a file is cut into documents.

Every function here is pure (str → str), so the Beam pipeline in `corpus.py` and the tests use the same code.
"""

from __future__ import annotations

import re
import unicodedata

DOC_SPLITS = ("file", "paragraph", "line")

# Line breaks of every flavour become "\n" (str.splitlines' set: CR, VT, FF, FS/GS/RS, NEL, LS, PS).
_LINE_BREAKS = re.compile("\r\n|[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
# Control characters (Unicode Cc) other than tab and newline, and the byte-order mark.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f\ufeff]")
# Unicode space separators (Zs) other than the ASCII space.
_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
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
    text = normalize_line_breaks(text)
    if gutenberg:
        text = strip_gutenberg(text)
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING_SPACE.sub("", text)
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


def normalize_for_dedup(text: str) -> str:
    """The form two documents must share to be exact duplicates, and the one MinHash shingles: case-folded, with
    every run of whitespace as one space."""
    return " ".join(text.casefold().split())
