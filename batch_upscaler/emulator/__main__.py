"""``python -m batch_upscaler.emulator``: run the emulator in the foreground (a manual, demo and benchmark aid).

The first stdout line is ``emulator listening on http://127.0.0.1:PORT`` (flushed), so a parent
process can start it with ``--port 0`` and read the real port back.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from batch_upscaler.emulator.faults import FaultKind
from batch_upscaler.emulator.host import run_forever
from batch_upscaler.emulator.settings import EmulatorConfig

# --help prints this as plain text (the module docstring's RST markup would show as raw backticks)
DESCRIPTION = ("Run the Bedrock-compatible emulator in the foreground (a manual, demo and benchmark aid). "
               "The first line on stdout is 'emulator listening on http://127.0.0.1:PORT' (flushed), so a parent "
               "process can start it with --port 0 and read the real port back.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m batch_upscaler.emulator", description=DESCRIPTION)
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (default)")
    parser.add_argument("--latency", type=float, default=0.0, help="fixed seconds added to each answer")
    parser.add_argument("--latency-median", type=float, default=None,
                        help="lognormal latency with this median in seconds (instead of --latency)")
    parser.add_argument("--latency-sigma", type=float, default=0.0,
                        help="spread of the lognormal latency: median * exp(sigma * N(0,1))")
    parser.add_argument("--quota-rpm", type=float, default=None, help="token bucket: requests per minute per model")
    parser.add_argument("--quota-burst", type=int, default=1, help="token bucket capacity (default 1)")
    parser.add_argument("--output-max-pixels", type=int, default=None)
    parser.add_argument("--png-compress-level", type=int, default=1)
    parser.add_argument("--canned-output", action="store_true",
                        help="benchmarks only: one output per (size, format), whatever the input")
    parser.add_argument("--canned-noise", action="store_true",
                        help="benchmarks only, with --canned-output: the output is per-pixel noise "
                             "(~29 MB as a 9.7 MP PNG, the worst case for size)")
    parser.add_argument("--fault-rates", type=json.loads, default={},
                        help='JSON object, e.g. \'{"throttle": 0.1, "internal_error": 0.02}\'')
    parser.add_argument("--fault-window", type=_window, default=None, metavar="START:END",
                        help="apply --fault-rates only from START to END seconds after the emulator starts "
                             "(e.g. 0:60 with '{\"service_unavailable\": 1}' for a one-minute outage)")
    parser.add_argument("--retry-after", type=float, default=None,
                        help="throttling answers carry a Retry-After header of this many seconds")
    parser.add_argument("--seed", type=int, default=0, help="seeds the fault and latency draws")
    parser.add_argument("--slow", type=float, default=30.0, help="seconds a SLOW fault stalls")
    parser.add_argument("--log", type=Path, default=None, help="JSON-lines request log file")
    parser.add_argument("--deny-access", action="store_true")
    parser.add_argument("--quotas-denied", action="store_true",
                        help="Service Quotas calls are denied (the quota is still enforced, just not published)")
    return parser


def _window(text: str) -> tuple[float, float]:
    start, sep, end = text.partition(":")
    try:
        return float(start), float(end) if sep else float("inf")
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a START:END window in seconds: {text!r}") from None


def parse_config(argv: Sequence[str] | None = None) -> EmulatorConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return EmulatorConfig(
            port=args.port, latency_s=args.latency, latency_median_s=args.latency_median,
            latency_sigma=args.latency_sigma, quota_rpm=args.quota_rpm, quota_burst=args.quota_burst,
            output_max_pixels=args.output_max_pixels, png_compress_level=args.png_compress_level,
            canned_output=args.canned_output, canned_noise=args.canned_noise, seed=args.seed, slow_s=args.slow,
            fault_rates={FaultKind(name): float(rate) for name, rate in args.fault_rates.items()},
            request_log_path=args.log, deny_access=args.deny_access, quotas_denied=args.quotas_denied,
            fault_window=args.fault_window,
            retry_after_s=args.retry_after,
        )
    except ValueError as exc:
        parser.error(str(exc))  # exits 2 with the usage line


def main(argv: Sequence[str] | None = None) -> None:
    run_forever(parse_config(argv))


if __name__ == "__main__":
    main()
