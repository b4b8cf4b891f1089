"""Property-based manifests: any document, any value for any key: a ManifestError naming a key path, or settings.

Never a traceback: the CLI maps ManifestError to exit 2 (tests/test_manifest.py checks that path).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch_upscaler.cli import main
from batch_upscaler.errors import ManifestError
from batch_upscaler.manifest import MANIFEST_SCHEMA, Key, load_settings
from batch_upscaler.settings import JobSettings
from tests.conftest import manifest_doc

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def key_paths(schema: Mapping[str, Key], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, key in schema.items():
        yield (*prefix, name)
        if key.children:
            yield from key_paths(key.children, (*prefix, name))


PATHS = sorted(key_paths(MANIFEST_SCHEMA)) + [("model", p) for p in ("prompt", "seed", "creativity")]


def load(doc: Any) -> JobSettings | ManifestError:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        (Path(tmp) / "photos").mkdir()
        try:
            return load_settings(path)
        except ManifestError as exc:
            return exc


def with_value(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    doc = manifest_doc()
    node = doc
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value
    return doc


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=values)
def test_any_value_for_any_key(path: tuple[str, ...], value: Any) -> None:
    result = load(with_value(path, value))
    if isinstance(result, ManifestError):
        assert result.problems
        top = path[0]
        assert any(p.startswith(top) or p.startswith("model.") for p in result.problems), result.problems


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=10), values, max_size=6) | values)
def test_any_document(doc: Any) -> None:
    result = load(doc)
    assert isinstance(result, ManifestError)  # no random document has every required key right
    assert all(":" in p for p in result.problems)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.yaml"
        path.write_text(text)
        try:
            load_settings(path)
        except ManifestError as exc:
            assert exc.problems


def test_cli_on_fuzzed_manifest_exits_2_without_traceback(capsys: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.yaml"
        path.write_text("version: 1\nname: x\nsources: {a: [1, {b: .nan}]}\nlimits: [1]\n"
                        "output: !!binary aGVsbG8=\nmodel: &a {name: fast, x: *a}\n")
        assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "sources:" in err
