"""The exception tree and the one place where exceptions become process exit codes.

Every error the CLI can end with derives from :class:`UpscalerError` and carries its exit
code, so the mapping lives here and nowhere else::

    UpscalerError                 1  (generic; also "some items failed")
    ├── UsageError                2  bad command line or manifest
    │   └── ManifestError         2  names the manifest key path
    ├── CheckpointError           2  unreadable or foreign checkpoint database
    ├── FatalBackendError         3  the whole run cannot succeed (auth, model access)
    ├── JobLockedError            4  another run of the same job holds the lock
    └── Interrupted              75  stopped by a signal or a cap; run again to resume
        ├── StateUnavailable     75  the checkpoint cannot be written (state disk full, database busy too long)
        └── OutputUnavailable    75  the output storage refuses writes (disk full, read-only, quota)
    (any other exception)        70  a bug: one line on stderr, the traceback with -v

Per-item problems are *not* exceptions: they are recorded as data in the checkpoint.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes, documented in README.md."""

    OK = 0
    ITEMS_FAILED = 1
    USAGE = 2
    FATAL_BACKEND = 3
    LOCKED = 4
    INTERNAL = 70  # EX_SOFTWARE: a bug; the checkpoint is still consistent
    INTERRUPTED = 75  # EX_TEMPFAIL: cron wrappers know it means "try again later"


class UpscalerError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code: ExitCode = ExitCode.ITEMS_FAILED


class UsageError(UpscalerError):
    """The command line or its inputs cannot be used."""

    exit_code = ExitCode.USAGE


class ManifestError(UsageError):
    """One or more manifest (or config file) problems, each naming a key path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        # every line of a problem indented alike: a multi-line one (a YAML caret under its column) keeps its shape
        lines = "\n".join(f"  {line}" for p in problems for line in p.split("\n"))
        super().__init__(f"{source}: invalid configuration:\n{lines}")


class CheckpointError(UpscalerError):
    """The checkpoint database is corrupt, locked by a foreign schema, or unusable."""

    exit_code = ExitCode.USAGE


class FatalBackendError(UpscalerError):
    """The backend refuses every request (credentials, model access, wrong model id)."""

    exit_code = ExitCode.FATAL_BACKEND


class JobLockedError(UpscalerError):
    """Another process is running the same job."""

    exit_code = ExitCode.LOCKED


class Interrupted(UpscalerError):
    """The run stopped early on request; the checkpoint is consistent and resumable."""

    exit_code = ExitCode.INTERRUPTED


class StateUnavailable(Interrupted):
    """The checkpoint cannot be written now (its disk is full, or another process holds it too long).

    A run-level stop, never an item failure: nothing recorded is lost, and the next run resumes.
    """


class OutputUnavailable(Interrupted):
    """The output storage refuses writes (ENOSPC, EROFS, EDQUOT): stop before paying for more.

    Items stay pending; images already returned are kept in ``<state_dir>/unsent-outputs/``.
    """
