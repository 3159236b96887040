"""vsock.reactor: the backend process's loop (fds, soon/later calls, cancellation, signals)."""
import os
import signal
import socket
import time

from host_sandboxer.vsock.reactor import Reactor


def test_timers_run_in_time_order_and_cancelled_ones_never():
    loop = Reactor()
    ran = []
    loop.call_later(0.03, ran.append, "late")
    loop.call_later(0.01, ran.append, "early")
    loop.call_later(0.02, ran.append, "cancelled").cancel()
    loop.call_soon(ran.append, "soon")
    loop.call_later(0.05, loop.stop)
    loop.run()
    loop.close()
    assert ran == ["soon", "early", "late"]


def test_readers_and_writers_fire_until_removed():
    loop = Reactor()
    ours, theirs = socket.socketpair()
    got = []

    def readable():
        got.append(ours.recv(100))
        loop.remove_reader(ours.fileno())
        loop.call_later(0.02, loop.stop)

    def writable():
        theirs.send(b"ping")
        assert loop.remove_writer(theirs.fileno()) and not loop.remove_writer(theirs.fileno())

    loop.add_reader(ours.fileno(), readable)
    loop.add_writer(theirs.fileno(), writable)
    loop.run()
    theirs.send(b"unread")  # no reader any more: nothing runs
    loop.call_later(0.02, loop.stop)
    loop.run()
    loop.close()
    assert got == [b"ping"]


def test_a_reader_removed_in_the_turn_that_found_it_ready_does_not_run():
    loop = Reactor()
    pairs = [socket.socketpair() for _ in range(2)]
    ran = []

    def first(name):
        ran.append(name)
        for ours, _ in pairs:   # whichever runs first removes both
            loop.remove_reader(ours.fileno())
        loop.stop()

    for i, (ours, theirs) in enumerate(pairs):
        loop.add_reader(ours.fileno(), first, i)
        theirs.send(b"x")
    loop.run()
    loop.close()
    assert len(ran) == 1


def test_a_failing_callback_is_logged_and_the_loop_goes_on(caplog):
    loop = Reactor()
    loop.call_soon(lambda: 1 / 0)
    loop.call_later(0.01, loop.stop)
    loop.run()
    loop.close()
    assert "ZeroDivisionError" in caplog.text


def test_a_signal_runs_its_handler_on_the_loop():
    loop = Reactor()
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        loop.add_signal_handler(signal.SIGUSR1, loop.stop)
        loop.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
        loop.call_later(5, loop.stop)  # a bound, were the signal lost
        began = time.monotonic()
        loop.run()
        assert time.monotonic() - began < 2
    finally:
        loop.close()
        signal.signal(signal.SIGUSR1, previous)
