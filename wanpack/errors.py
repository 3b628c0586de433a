"""The one error type users see.

Every room (convert, runtime, manifests, the CLI) raises a subclass of :class:`WanpackError` for anything the
user can fix. Its message is one line, worded "what went wrong - what to do"; the CLI prints it without a traceback
(set WANPACK_DEBUG=1 to see one) and exits with the class's exit code.
"""

from __future__ import annotations


class WanpackError(Exception):
    """A failure the user can act on; ``str(err)`` is the whole message."""

    exit_code: int = 1


class UsageError(WanpackError):
    """The command line or a config file asks for something impossible."""

    exit_code = 2


class VerificationError(WanpackError):
    """Bytes on disk do not match what the manifest promises (exit 1, as scripts checking `wanpack verify` expect)."""


class SourceError(WanpackError):
    """A source checkpoint is unreadable, corrupt, or not the architecture it claims to be."""


class PackFormatError(WanpackError):
    """A pack's manifest or shard breaks the pack format (docs/FORMAT.md)."""


class PackBusyError(WanpackError):
    """Another wanpack process is writing the same pack (a second conversion to the same --out)."""


class NoSpaceError(WanpackError):
    """Not enough free disk space to finish."""
