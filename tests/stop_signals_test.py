"""StopSignals: a signal becomes the flag, a second Ctrl-C stops at once, and the previous
handlers come back."""

import os
import signal

import pytest

from ddpm_jax.stop_signals import StopSignals


def test_sigterm_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        assert not signals.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.requested
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_ctrl_c_interrupts():
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_an_ignored_sighup_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGHUP)
            assert not signals.requested
    finally:
        signal.signal(signal.SIGHUP, previous)
