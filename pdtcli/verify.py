"""The loss gate of `--verify CMD`: the user's own command judges a fused checkpoint before it is published.

The rule, in one sentence: a non-zero exit or a timeout rejects, and an exit 0 accepts unless the last line the
command printed is a number (a loss, lower is better) that is above the one it prints for the newest checkpoint.

The command is split as a shell splits words (`shlex`; no shell runs it); `{}` in it is replaced by the path of
the checkpoint to judge, else that path is its last argument. It runs with no stdin, its stdout read by pdt (for
the loss), its stderr pdt's own; on a timeout its whole process group is killed.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

DEFAULT_TIMEOUT = 3600.0  # seconds one evaluation may take
PLACEHOLDER = "{}"


@dataclass(frozen=True)
class Verdict:
    """What the command said of a candidate: `accepted`, `why` (one line), and what it was read from: the
    losses printed for the candidate and the newest checkpoint, or the candidate's exit code (None: timed out)."""

    accepted: bool
    why: str
    loss: float | None = None
    plain_loss: float | None = None
    exit_code: int | None = None

    def as_dict(self) -> dict:
        return {"accepted": self.accepted, "why": self.why, "loss": self.loss, "plain_loss": self.plain_loss,
                "exit_code": self.exit_code}


@dataclass(frozen=True)
class _Run:
    """One run of the command: its exit code (None: killed at the timeout) and the loss it printed (None: none)."""

    exit_code: int | None
    loss: float | None


def command_words(command: str) -> list[str]:
    """The words of `--verify CMD`, checked: UsageError (exit 2) for an empty command, unbalanced quotes, or a
    program that is not found (on PATH, or at the path given) or cannot be executed, before any work is done."""
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise UsageError(f"--verify {command!r}: {exc}; quote the command as one argument") from None
    if not words:
        raise UsageError("--verify: the command is empty")
    if shutil.which(words[0]) is None:
        raise UsageError(f"--verify: cannot run {words[0]!r}: no such executable (give its path, or put it on PATH)")
    return words


@dataclass(frozen=True)
class Verifier:
    """`--verify CMD` with its `timeout` (seconds per evaluation)."""

    command: str
    timeout: float = DEFAULT_TIMEOUT

    def argv(self, path: Path) -> list[str]:
        """The command's words for judging `path`: `{}` replaced by it, else it appended."""
        words = command_words(self.command)
        if any(PLACEHOLDER in word for word in words):
            return [word.replace(PLACEHOLDER, str(path)) for word in words]
        return [*words, str(path)]

    def judge(self, candidate: Path, plain: Path) -> Verdict:
        """The verdict on the fused checkpoint at `candidate` (its temporary path), running the command on the
        newest checkpoint `plain` too when the candidate's run printed a loss."""
        run = self._run(candidate)
        if run.exit_code is None:
            return Verdict(False, f"the command ran past --verify-timeout {self.timeout:g} s")
        if run.exit_code != 0:
            return Verdict(False, f"the command exited {run.exit_code}", exit_code=run.exit_code)
        if run.loss is None:
            return Verdict(True, "the command exited 0", exit_code=0)
        base = self._run(plain)
        if base.exit_code != 0 or base.loss is None:
            said = "ran past the timeout" if base.exit_code is None else (
                f"exited {base.exit_code}" if base.exit_code else "printed no loss")
            return Verdict(False, f"loss {run.loss:.6g}, but on {plain.name} the command {said}: nothing to compare "
                           "with", loss=run.loss, exit_code=0)
        accepted = run.loss <= base.loss  # a NaN loss is never accepted
        return Verdict(accepted, f"loss {run.loss:.6g} fused against {base.loss:.6g} for {plain.name}", run.loss,
                       base.loss, 0)

    def _run(self, path: Path) -> _Run:
        """Run the command on `path` in a process group of its own, so that a timeout (or Ctrl-C) ends it and
        whatever it started; a program that cannot be started is a UsageError."""
        argv = self.argv(path)
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise UsageError(f"--verify: cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        with process:
            try:
                out, _ = process.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill(process)
                return _Run(None, None)
            except BaseException:
                _kill(process)
                raise
        return _Run(process.returncode, _loss(out.decode(errors="replace")))


def _kill(process: subprocess.Popen) -> None:
    """End the command's process group and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def _loss(stdout: str) -> float | None:
    """The number on the last non-empty line of `stdout`, or None when that line is not one number."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        return float(lines[-1])
    except ValueError:
        return None
