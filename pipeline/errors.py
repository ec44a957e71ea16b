"""Errors that the CLI turns into one clear message and an exit code, never a traceback."""


class UserError(Exception):
    """A mistake the user can fix: a bad config, a missing file, too many rejected inputs. Exit code 2."""

    exit_code = 2


class BadInput(Exception):
    """One input sample that cannot be used. The stage records it in rejects.jsonl and goes on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
