"""``python -m batch_upscaler``: the same CLI as the ``batch-upscaler`` command."""

from batch_upscaler.entry import main

main()
