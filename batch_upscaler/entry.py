"""The process entry point: the stop-signal handlers first, then everything else.

Installed before the command line's own (heavier) imports, so a SIGTERM or Ctrl-C that arrives
while the process is still starting is recorded as a stop request instead of killing it.
"""

from __future__ import annotations

import sys

from batch_upscaler.signals import StopSignals


def main() -> None:
    signals = StopSignals().install()
    from batch_upscaler.cli import main as cli_main

    sys.exit(cli_main(signals=signals))
