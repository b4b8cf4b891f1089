"""``python -m batch_upscaler``: the same CLI as the ``batch-upscaler`` command."""

from batch_upscaler.cli import entry_point

entry_point()
