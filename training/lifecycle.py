"""Process lifecycle of a run: no process outlives the one the user started, one process owns a run
folder at a time, and a killed checkpoint write leaves nothing behind.

- `run_child` starts torchrun with a parent-death signal and forwards SIGTERM/SIGINT to it, then waits:
  `kill PID`, `timeout` and Ctrl-C stop the whole run; `kill -9 PID` makes the kernel send SIGTERM to
  torchrun (prctl PR_SET_PDEATHSIG), which stops its ranks; each rank also asks for SIGTERM when
  torchrun dies (`die_with_parent`).
- `lock_run_dir` holds an flock on <run_dir>/.lock for the life of the process; a second run (e.g. a
  resume) in the same folder stops with one line naming the holder's PID.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h
LOCK_ENV = "SPARSEFORMER_RUN_LOCK"  # set by the launching process: its children run under its lock
_held: dict = {}  # run folder -> its open lock file, kept for the life of the process


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def run_child(cmd: list[str], env: dict) -> int:
    """Run `cmd` to its end and return its exit code; SIGTERM/SIGINT to us go to it and are waited for.
    A child killed by one of those signals returns -signum (subprocess convention)."""
    # its own session: a Ctrl-C in the terminal reaches only us (the terminal's foreground group), and we
    # stop torchrun with one SIGTERM, instead of every rank printing a KeyboardInterrupt traceback
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent, start_new_session=True)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        if proc.poll() is None:  # SIGTERM either way: torchrun stops its ranks without a traceback each
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = proc.wait()
                break
            except InterruptedError:
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return -received[0] if received and code != 0 else code


def lock_run_dir(run_dir: str | Path) -> None:
    """Own `run_dir` for the life of this process (and the children started with `child_lock_env`), or
    stop with one line if another live process owns it."""
    key = str(Path(run_dir).resolve())
    if os.environ.get(LOCK_ENV) == key or key in _held:
        return  # the launching process holds it for us, or this one already does (train() run twice)
    path = Path(run_dir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise SystemExit(f"run folder {run_dir} is in use by process {holder}; stop it first, or pick another "
                         "run_dir=") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _held[key] = f


def child_lock_env(run_dir: str | Path) -> dict:
    return {LOCK_ENV: str(Path(run_dir).resolve())}


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete `.<name>.tmp.<pid>` files left by a write that was killed (checkpoint.save_atomic); call
    while holding the run-folder lock, so no live writer of this run can own them."""
    gone = []
    for p in Path(run_dir).rglob(".*.tmp.*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


FAILED = ".failed"  # in the run folder: the first failing rank's one-line reason, read by the launcher

# torchrun, with its own failure report (a traceback and a table of every rank) silenced: the ranks have
# logged their error into train.log and left one line in <run>/.failed, which the launcher prints.
TORCHRUN_QUIET = (
    "import logging, sys\n"
    "from torch.distributed.run import main\n"
    "logging.getLogger('torch.distributed.elastic').setLevel(logging.CRITICAL)\n"
    "try:\n    main()\n"
    "except SystemExit:\n    raise\n"
    "except Exception:\n    sys.exit(1)\n"
)


def record_rank_failure(run_dir: str | Path, error: BaseException, rank: int) -> None:
    """A rank's uncaught error: the traceback into the run's log files only (train.log; not the terminal,
    where every rank would print it), and one line into <run>/.failed (the first rank to fail writes it)."""
    import logging
    import traceback

    text = "".join(traceback.format_exception(error))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.stream.write(f"rank {rank} failed:\n{text}")
            handler.flush()
    from hydra.errors import InstantiationException

    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__  # its first line is "Error in call to target '...':", the reason follows
    first = (str(error).strip().splitlines() or [""])[0]
    line = f"rank {rank}: {type(error).__name__}: {first}" if first else f"rank {rank}: {type(error).__name__}"
    try:
        fd = os.open(Path(run_dir) / FAILED, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(line + "\n")


def take_rank_failure(run_dir: str | Path) -> str | None:
    """The line a failed rank left (removed once read), or None."""
    path = Path(run_dir) / FAILED
    if not path.is_file():
        return None
    line = path.read_text().strip()
    path.unlink(missing_ok=True)
    return line or None
