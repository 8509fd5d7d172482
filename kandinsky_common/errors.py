"""The one exception type for user mistakes, and the CLI wrapper that turns it into `error: ...`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix: bad path, missing column, impossible flag combination, ...

    The message is one line naming the problem and the fix. The CLI prints it as `error: <message>`
    and exits with status 2, before anything was written or deleted.
    """


class NonFiniteLoss(UserError):
    """The loss or gradient norm became NaN/Inf: the run stops, its last checkpoint is kept."""


class CheckpointDamaged(UserError):
    """A checkpoint folder that is complete by name but cannot be read back."""

    def __init__(self, path: str | Path, damage: str):
        self.path = Path(path)
        self.damage = damage
        super().__init__(
            f"checkpoint {path} is damaged ({damage}); resume from another checkpoint with "
            "--resume_from_checkpoint, or delete it"
        )


INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C (128 + SIGINT)


def run_cli(
    main: Callable[[list[str] | None], int | None],
    argv: list[str] | None = None,
    interrupted: str = "nothing was written after the interruption",
) -> int:
    """Run `main(argv)`; a UserError becomes one `error:` line on stderr and exit status 2, and
    Ctrl-C (KeyboardInterrupt) one `interrupted:` line with `interrupted` and status 130."""
    try:
        code = main(argv)
    except UserError as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted (Ctrl-C): {interrupted}", file=sys.stderr)
        return INTERRUPTED
    return int(code or 0)
