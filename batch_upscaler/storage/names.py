"""How items and outputs are named to people (logs, reports, failed.txt, ``--only``): the path a user
can ``ls`` (relative to the manifest's folder when below it), or the object's ``s3://`` URL.

Pure: built from the settings alone, so a report can be written without opening any storage.
"""

from __future__ import annotations

from pathlib import Path

from batch_upscaler.discovery import display_path, parse_source
from batch_upscaler.settings import JobSettings
from batch_upscaler.storage.urls import S3Url, is_s3, parse_s3


class Names:
    def __init__(self, settings: JobSettings) -> None:
        self.base_dir = settings.base_dir
        self.local = {s: parse_source(s, settings.base_dir) for s in settings.sources if not is_s3(s)}
        self.s3 = {s: parse_s3(s) for s in settings.sources if is_s3(s)}
        self.output_dir = settings.output_dir
        # Reports name every item: joining strings, not Paths, keeps a 10,000-item report fast.
        self._prefixes = {s: _prefix(root.root, self.base_dir) for s, root in self.local.items()
                          if not root.single_file}
        self._output_prefix = _prefix(self.output_dir, None) if isinstance(self.output_dir, Path) else None

    def item(self, source: str, relpath: str, key: str | None = None) -> str:
        """An item's name: its real path, or its URL (an S3 item's key is its URL)."""
        if source in self.s3:
            return key if key and is_s3(key) else str(self.s3[source].child(relpath))
        prefix = self._prefixes.get(source)
        if prefix is not None:
            return prefix + relpath
        return display_path(self.local, source, relpath, self.base_dir)

    def output(self, relpath: str) -> str:
        """An output's name: its path (relative to the manifest's folder when below it), or its URL."""
        if isinstance(self.output_dir, S3Url):
            return str(self.output_dir.child(relpath))
        path = self.output_dir / relpath
        return path.relative_to(self.base_dir).as_posix() if path.is_relative_to(self.base_dir) else str(path)

    def output_location(self, relpath: str) -> str:
        """Where an output is, for machines (report.json, items.csv): an absolute path, or its URL."""
        if self._output_prefix is None:
            assert isinstance(self.output_dir, S3Url)
            return str(self.output_dir.child(relpath))
        return self._output_prefix + relpath

    def local_source(self, source: str, relpath: str) -> Path | None:
        """The file behind a local item (None for an S3 one)."""
        root = self.local.get(source)
        return None if root is None else root.path_of(relpath)

    @property
    def local_outputs(self) -> bool:
        """The outputs are local files (not S3 objects)."""
        return isinstance(self.output_dir, Path)

    def local_output(self, relpath: str) -> Path | None:
        return self.output_dir / relpath if isinstance(self.output_dir, Path) else None


def _prefix(root: Path, base_dir: Path | None) -> str:
    """What goes before a (clean, relative, POSIX) relpath below ``root``: ``root`` relative to
    ``base_dir`` when below it, else absolute; ``""`` when they are the same folder."""
    if base_dir is not None and root.is_relative_to(base_dir):
        rel = root.relative_to(base_dir).as_posix()
        return "" if rel == "." else rel + "/"
    text = root.as_posix()
    return text if text.endswith("/") else text + "/"
