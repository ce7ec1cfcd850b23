"""Stop signals of a training run: SIGTERM, SIGHUP and a first Ctrl-C become a flag that
the loop checks, so that it saves a checkpoint and stops cleanly."""

import signal
import threading

from absl import logging


class StopSignals:
    """SIGTERM, SIGHUP (a closed terminal) and a first Ctrl-C (SIGINT) become a flag the loop
    checks, so that it saves a checkpoint and stops cleanly. A second Ctrl-C stops at once
    (KeyboardInterrupt), after the save in flight is finished. SIGHUP and SIGINT stay ignored
    where the run started with them ignored (SIGHUP under nohup, SIGINT in a script's
    background job); SIGTERM, how schedulers stop a job, is always honoured."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            ignored = {s for s in self.SIGNALS if signal.getsignal(s) is signal.SIG_IGN}
            handled = [s for s in self.SIGNALS if s == signal.SIGTERM or s not in ignored]
            self._previous = {s: signal.signal(s, self._handle) for s in handled}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        again = " (Ctrl-C again: stop without saving)" if signum == signal.SIGINT else ""
        logging.warning("%s: saving a checkpoint and stopping%s", name, again)
        self.requested = True

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
