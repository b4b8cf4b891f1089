"""Makes the repository root importable when pytest is run without a project-level pythonpath setting."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    # tests/ has no __init__.py, so pytest's rootdir insertion stops at tests/, not the repo root.
    sys.path.insert(0, str(_ROOT))
