"""The process entry point: the stop-signal handlers first, then everything else.

Importing this module installs a minimal SIGINT/SIGTERM handler before anything else is
imported (the command line's imports take ~100 ms), so a stop requested while the process is
still starting is recorded, not fatal. :func:`main` then hands what was recorded to the real
handlers (batch_upscaler.signals) and runs the command line. What Python does before any code of
ours runs (its own start-up, ~10 ms) is outside any program's reach.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

_EARLY: list[int] = []  # signals that arrived before the real handlers were installed


def _remember(signum: int, frame: FrameType | None) -> None:
    _EARLY.append(signum)


for _signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signum, _remember)


def main() -> None:
    from batch_upscaler.signals import StopSignals

    signals = StopSignals().install()
    for signum in _EARLY:
        signals.request(signal.Signals(signum).name)
    from batch_upscaler.cli import main as cli_main

    sys.exit(cli_main(signals=signals))
