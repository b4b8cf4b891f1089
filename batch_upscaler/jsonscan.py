"""Find the image in an InvokeModel 200 body while the body arrives, and decode it piece by piece.

The body is one JSON object, ``{"seeds": [...], "finish_reasons": [...], "images": ["<base64>"]}``
with its keys in any order. The text of ``images[0]`` (megabytes) is base64-decoded as it arrives,
four characters at a time (a partial group waits for the next piece), and handed out as decoded
pieces; everything else, the *rest* (a few dozen bytes), is kept with ``""`` in place of the image
and parsed by ``json`` once the body has ended. A light lexer over the rest (strings, nesting, the
top-level keys) finds where the image starts; ``json`` alone judges whether the rest is valid.

The verdict comes at the end, in parse_response's order: not JSON, not an object, filtered (a
non-null ``finish_reasons[0]``, whatever the image), no image, a bad image. It is stricter than a
JSON parser on purpose, and ``bedrock.parse_response`` (the whole-body reference) is the same
except where noted:

* the image must be plain base64: a JSON escape in it (``\\/``) or any other character makes it
  a bad image (json would accept ``\\/``);
* exactly one image: a second one is a bad answer (parse_response takes the first);
* no key may repeat (json keeps the last), the body must be UTF-8 without a byte-order mark
  (json also reads UTF-16/32 and a BOM), and ``finish_reasons`` must be a list or null;
* the rest may hold at most :data:`REST_LIMIT` bytes (counting a bad image's text from the piece
  where it went bad): a bigger body is garbage, and reading stops there.

A body that can only be bad from here on (the limit, a broken escape in the image) sets
:attr:`ResponseScanner.verdict` at once, so the caller can stop reading it.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Mapping
from enum import Enum, auto
from typing import Any, Final

import pybase64

from batch_upscaler.retry import AttemptError

REST_LIMIT: Final = 1 << 20
_WHITESPACE: Final = frozenset(b" \t\n\r")
_STRING_RUN: Final = re.compile(rb'[^"\\]+')
_QUOTE, _BACKSLASH, _OPEN_OBJECT = ord('"'), ord("\\"), ord("{")
_IMAGES_PATH: Final = b':["'  # after the top-level "images" key: its array, and the first element's quote


class _Image(Enum):
    ABSENT = auto()  # no top-level "images" array whose first element is a string
    GOOD = auto()
    BAD = auto()  # not plain base64


def not_json(size: int) -> AttemptError:
    return AttemptError("bad_response", f"response body is not JSON ({size} bytes)")


class ResponseScanner:
    """Feed the body's pieces in order; each call returns the image's next decoded pieces."""

    def __init__(self, rest_limit: int = REST_LIMIT) -> None:
        self.size = 0
        self.verdict: AttemptError | None = None  # set when the answer can only be bad: stop reading
        self._limit = rest_limit
        self._rest = bytearray()
        self._stack: list[int] = []  # open brackets
        self._expect_key = False
        self._in_string = self._escape = False
        self._key: bytearray | None = None  # a top-level key being read
        self._images_seen = False
        self._path = 0  # how much of _IMAGES_PATH has been seen after the "images" key
        self._image = _Image.ABSENT
        self._decoder: _Base64Text | None = None  # while inside images[0]

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        out: list[bytes] = []
        # bytes.find is memchr; a regular expression for "quote or backslash" scans 50x slower.
        text = data if isinstance(data, bytes) else bytes(data)
        view = memoryview(text)
        self.size += len(view)
        i = 0
        while i < len(view) and self.verdict is None:
            i = self._image_text(text, view, i, out) if self._decoder is not None else self._lex(view, i)
            if len(self._rest) > self._limit:
                self.verdict = AttemptError("bad_response", f"response body has more than {self._limit} bytes "
                                            "besides its image")
        return out

    def finish(self) -> AttemptError | None:
        """None when the body held exactly one good image and was not filtered; else why not."""
        if self.verdict is not None:
            return self.verdict
        if self._decoder is not None or self._in_string:
            return not_json(self.size)  # cut off inside a string
        try:
            document = json.loads(self._rest.decode("utf-8"), object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return not_json(self.size)
        if not isinstance(document, Mapping):
            return AttemptError("bad_response", "response body is not a JSON object")
        return filtered(document) or self._image_verdict(document)

    def _image_verdict(self, document: Mapping[str, Any]) -> AttemptError | None:
        if self._image is _Image.ABSENT:
            return AttemptError("bad_response", "response has no image")
        if len(document["images"]) > 1:
            return AttemptError("bad_response", f"response has {len(document['images'])} images, not 1")
        if self._image is _Image.BAD:
            return AttemptError("bad_response", "response image is not valid base64")
        return None

    # ---- the rest: everything but the image's text ------------------------------------------
    def _lex(self, view: memoryview, i: int) -> int:
        """Lex the rest from ``i``; returns where the image's text starts, or the end of ``view``."""
        start, n = i, len(view)
        while i < n:
            if self._in_string:
                i = self._string(view, i)
                continue
            byte = view[i]
            i += 1
            if byte in _WHITESPACE:
                continue
            if self._path and self._on_images_path(byte):
                self._rest += view[start:i]
                self._decoder = _Base64Text()
                return i
            self._structure(byte)
        self._rest += view[start:i]
        return i

    def _on_images_path(self, byte: int) -> bool:
        """Follow ``"images": ["``; True at the quote that opens the first element."""
        if byte != _IMAGES_PATH[self._path - 1]:
            self._path = 0
            return False
        self._path = self._path + 1 if self._path < len(_IMAGES_PATH) else 0
        return not self._path

    def _structure(self, byte: int) -> None:
        if byte in b"{[":
            self._stack.append(byte)
            self._expect_key = byte == _OPEN_OBJECT
        elif byte in b"}]":
            if self._stack:
                self._stack.pop()
            self._expect_key = False
        elif byte == ord(","):
            self._expect_key = bool(self._stack) and self._stack[-1] == _OPEN_OBJECT
        elif byte == _QUOTE:
            self._in_string = True
            top_level_key = self._expect_key and self._stack == [_OPEN_OBJECT]
            self._key = bytearray() if top_level_key else None
            self._expect_key = False
        else:
            self._expect_key = False

    def _string(self, view: memoryview, i: int) -> int:
        """Inside a string of the rest: skip to its end, keeping a top-level key's text."""
        if self._escape:
            self._escape = False
            self._keep_key(view[i:i + 1])
            return i + 1
        run = _STRING_RUN.match(view, i)
        if run is not None:
            self._keep_key(view[i:run.end()])
            i = run.end()
            if i == len(view):
                return i
        if view[i] == _BACKSLASH:
            self._escape = True
            self._keep_key(view[i:i + 1])
        else:
            self._in_string = False
            self._key_done()
        return i + 1

    def _keep_key(self, text: memoryview) -> None:
        if self._key is not None:
            self._key += text

    def _key_done(self) -> None:
        if self._key is None:
            return
        key, self._key = bytes(self._key), None
        try:  # a key may spell "images" with escapes; json decides what it says
            name = json.loads(b'"' + key + b'"') if b"\\" in key else key.decode("utf-8")
        except ValueError:
            return
        if name == "images" and not self._images_seen:
            self._images_seen = True
            self._path = 1

    # ---- the image's text --------------------------------------------------------------------
    def _image_text(self, text: bytes, view: memoryview, i: int, out: list[bytes]) -> int:
        """Decode the image's text from ``i``; returns where the rest resumes (or the end of ``view``)."""
        decoder = self._decoder
        assert decoder is not None
        quote = text.find(b'"', i)
        end = len(text) if quote < 0 else quote
        backslash = text.find(b"\\", i, end)
        end = end if backslash < 0 else backslash
        if not decoder.take(view[i:end], out):  # not base64: the text goes on as a string of the rest
            self._to_rest(decoder.carry + bytes(view[i:end]))
            return end
        if end == len(view):
            return end
        if view[end] == _BACKSLASH:  # an escape is never base64; the rest's lexer reads the string on
            self._to_rest(decoder.carry)
            return end
        self._image = _Image.GOOD if decoder.close() else _Image.BAD
        if self._image is _Image.BAD:
            self._rest += decoder.carry  # characters that were never decoded: json judges them
        self._decoder = None
        self._rest += b'"'
        return end + 1

    def _to_rest(self, text: bytes) -> None:
        """The image is bad: the rest of its text is read (and judged by json) as a string of the rest."""
        self._image, self._decoder = _Image.BAD, None
        self._in_string = True
        self._rest += text


class _Base64Text:
    """Base64 text arriving in runs: decoded four characters at a time, padding only at its end."""

    def __init__(self) -> None:
        self.carry = b""  # up to 3 characters waiting for the rest of their group
        self._padded = False  # a group with '=' was decoded: nothing may follow it

    def take(self, run: memoryview, out: list[bytes]) -> bool:
        """Decode ``run`` (with the carry); False if it cannot be part of valid base64."""
        if self.carry:
            need = 4 - len(self.carry)
            if len(run) < need:
                self.carry += run
                return True
            if not self._decode(self.carry + run[:need], out):
                return False
            self.carry, run = b"", run[need:]
        whole = len(run) - len(run) % 4
        if whole and not self._decode(run[:whole], out):
            return False
        self.carry = bytes(run[whole:])
        return True

    def close(self) -> bool:
        """The text has ended: True if it was valid base64 (no group left incomplete)."""
        return not self.carry

    def _decode(self, text: bytes | memoryview, out: list[bytes]) -> bool:
        if self._padded:
            return False
        try:
            piece = pybase64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return False
        self._padded = len(piece) * 4 != len(text) * 3  # '=' ended a group
        if piece:
            out.append(piece)
        return True


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a key is repeated")
    return document


def filtered(document: Mapping[str, Any]) -> AttemptError | None:
    """``content_filtered`` for a non-null ``finish_reasons[0]``; bad_response for a value that is
    neither a list nor empty (parse_response used to fail on it with an internal error)."""
    reasons = document.get("finish_reasons")
    if not reasons:  # missing, null or empty (as parse_response has always read it)
        return None
    if not isinstance(reasons, list):
        return AttemptError("bad_response", "response finish_reasons is not a list")
    return None if reasons[0] is None else AttemptError("content_filtered", str(reasons[0]))
