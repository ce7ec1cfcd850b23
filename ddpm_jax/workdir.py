"""The training workdir: created and checked before any work starts, removed again only if
a run that created it wrote nothing, and locked so that one training run writes it at a time.

The lock is `workdir/train.lock` (JSON: host, pid, start time), whose modification time a
daemon thread refreshes every HEARTBEAT_S seconds. A lock of this host is stale, and is
taken over with a warning, exactly when its process no longer exists (a killed run): a
live process keeps it however long it is silent (a run suspended with Ctrl-Z). A lock of
another host is stale when its heartbeat is older than STALE_S. Otherwise the second run
stops at once with a message naming the holder. A run whose lock was taken over all the
same (another host judged it silent) finds out at its next heartbeat or save, and stops
without writing anything more (`Lock.check`).
"""

import json
import os
import pathlib
import socket
import threading
import time

from absl import logging

from ddpm_jax import fs
from ddpm_jax.errors import UserError

HEARTBEAT_S = 30.0
STALE_S = 120.0


def check_workdir(workdir):
    """Create workdir if needed and make sure it is writable, before any work starts.
    Returns (path, whether this call created it)."""
    path = fs.as_path(workdir)
    try:
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{socket.gethostname()}_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except Exception as e:  # an OSError, or a bucket client's error (no access, no bucket)
        raise UserError(
            f"workdir {str(path)!r} is not writable ({e}); choose another --workdir"
        ) from e
    return path, created


def remove_if_unused(path):
    """Delete a workdir this run created, if no file was written in it (a run that stopped
    before its first step leaves nothing behind). Never touches a file."""
    if not fs.is_local(path):
        return  # a bucket has no empty directories to leave behind
    path = pathlib.Path(path)
    if any(p.is_file() for p in path.rglob("*")):
        return
    for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        sub.rmdir()
    path.rmdir()


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Lock:
    """`with Lock(workdir):` holds workdir/train.lock for the duration (see the module)."""

    def __init__(self, workdir):
        self.path = fs.as_path(workdir) / "train.lock"
        self.holder = dict(host=socket.gethostname(), pid=os.getpid(), since=time.time())
        self._stop = threading.Event()
        self._thread = None
        self.lost = None  # the holder that took the lock over, once this run has lost it

    def _read(self):
        """(holder dict or None if unreadable, seconds since its last heartbeat)."""
        try:
            age = time.time() - self.path.stat().mtime
            return json.loads(self.path.read_text()), age
        except FileNotFoundError:
            return None, float("inf")
        except (OSError, ValueError):  # being written, or damaged: judged by its age alone
            return None, age

    def _same_host(self, holder):
        return isinstance(holder, dict) and holder.get("host") == self.holder["host"]

    def _is_stale(self, holder, age):
        if self._same_host(holder):  # a live process keeps its lock, even if suspended
            return not _process_exists(holder.get("pid", -1))
        return age > STALE_S

    def _busy_message(self, holder, age):
        who = "another run"
        if isinstance(holder, dict):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            who = f"pid {holder.get('pid')} on host {holder.get('host')} (since {since})"
        if self._same_host(holder):
            alive = "a live process of this host (if it is suspended, resume it with fg or stop it)"
            expiry = "is taken over once that process is gone"
        else:
            alive, expiry = (
                f"alive {age:.0f} s ago",
                f"expires {STALE_S:.0f} s after its last heartbeat",
            )
        return (
            f"workdir {str(self.path.parent)!r} is being trained by {who}, {alive}; stop that "
            f"run first, or use another --workdir. If it is gone, its lock {self.path} {expiry}"
        )

    def _create(self):
        """Write the lock, or FileExistsError if there is one. Locally this is atomic
        (O_EXCL); in a bucket, two runs starting within the same second may both pass."""
        text = json.dumps(self.holder)
        if not fs.is_local(self.path):
            if self.path.exists():
                raise FileExistsError(str(self.path))
            self.path.write_text(text)
            return
        fd = os.open(str(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def acquire(self):
        for _ in range(3):
            try:
                self._create()
            except FileExistsError:
                holder, age = self._read()
                if not self._is_stale(holder, age):
                    raise UserError(self._busy_message(holder, age)) from None
                logging.warning("taking over the stale lock %s of %s", self.path, holder)
                self.path.unlink(missing_ok=True)
                continue
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
            return self
        raise UserError(f"could not lock {self.path}: other runs keep taking it")

    def _taken_over(self):
        """Whether another run holds the lock now (then kept in self.lost); a lock that is
        being written (unreadable) is given the benefit of the doubt."""
        if self.lost is None:
            holder, age = self._read()
            if age == float("inf") or (isinstance(holder, dict) and holder != self.holder):
                self.lost = holder or {}
        return self.lost is not None

    def check(self):
        """Raise UserError if this run's lock was taken over (it must not write)."""
        if self._thread is not None and self._taken_over():
            who = "another run"
            if self.lost:
                who = f"pid {self.lost.get('pid')} on host {self.lost.get('host')}"
            raise UserError(
                f"the lock {self.path} of this run was taken over by {who} "
                "while this run was silent (suspended, or cut off): it stopped without writing "
                "more. Let one run go on: stop the other, then start this command again"
            )

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            if self._taken_over():
                return  # never refresh (or, in a bucket, overwrite) another run's lock
            try:
                if fs.is_local(self.path):
                    os.utime(str(self.path))
                else:  # an object's time is that of its last write
                    self.path.write_text(json.dumps(self.holder))
            except Exception:  # the next run judges the lock by its age
                return

    def release(self):
        """Remove the lock if it is still ours (never another run's)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        holder, _ = self._read()
        if holder == self.holder:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
