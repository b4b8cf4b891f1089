"""Output naming: render ``output.naming`` templates into paths that stay inside the output root.

Fields: ``{relpath}`` (the source's path below its source root, without extension: mirrors the
tree), ``{stem}`` (file name without extension), ``{ext}`` (the source's extension, no dot),
``{model}`` (conservative/creative/fast) and ``{scale}`` (the expected scale factor from the
model's documented output size, e.g. ``4x``; known before any request, so collisions can be found
up front). The output format's extension is always appended.
"""

from __future__ import annotations

import posixpath
import string
import unicodedata
from dataclasses import dataclass
from pathlib import PurePosixPath

from batch_upscaler.settings import NameCompare

FIELDS = frozenset({"relpath", "stem", "ext", "model", "scale"})
DEFAULT_TEMPLATE = "{relpath}"


class NamingError(ValueError):
    """A template or a rendered path that cannot be used."""


def template_problem(template: str) -> str | None:
    """Why ``template`` is not a usable naming template, or None."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"is not a valid template ({exc})"
    names = [name for _, name, spec, conv in parsed if name is not None]
    unknown = sorted({n for n in names if n not in FIELDS})
    if unknown:
        return f"unknown field(s) {', '.join('{' + n + '}' for n in unknown)}; use {', '.join(sorted(FIELDS))}"
    if any(spec or conv for _, name, spec, conv in parsed if name is not None):
        return "fields take no format spec or conversion"
    if not names:
        return "must use at least one field, or every file would get the same name"
    return None


@dataclass(frozen=True)
class NameParts:
    relpath: str  # source path below its root, POSIX
    model: str
    scale: float


def render(template: str, parts: NameParts, extension: str) -> str:
    """The output path relative to the output root; raises NamingError if it would escape."""
    stem_path, ext = posixpath.splitext(parts.relpath)
    name = template.format(relpath=stem_path, stem=posixpath.basename(stem_path), ext=ext.lstrip("."),
                           model=parts.model, scale=f"{parts.scale:.3g}x")
    rel = PurePosixPath(posixpath.normpath(name + extension))
    if rel.is_absolute() or not rel.parts or rel.parts[0] in ("..", ".") or ".." in rel.parts:
        raise NamingError(f"output path {name + extension!r} would leave the output root")
    if any(part.startswith(".") for part in rel.parts):
        raise NamingError(f"output path {rel} has a hidden component (reserved for temporary files)")
    return rel.as_posix()


def fold(path: str, mode: NameCompare) -> str:
    """``path`` as the output filesystem compares names, for output ownership.

    Two items whose outputs fold to the same text would write one file: ``a.PNG`` and ``a.png`` on
    a case-insensitive volume, or an NFC and an NFD ``é`` on one that normalises names.
    """
    if mode is NameCompare.EXACT:
        return path
    normal = unicodedata.normalize("NFC", path)
    return unicodedata.normalize("NFC", normal.casefold()) if mode is NameCompare.CASEFOLD else normal
