"""The process's lifecycle: STARTING -> SERVING -> DRAINING -> STOPPED, and what each signal means in each state.

=========  ==================================  ===================================
state      SIGHUP                              SIGTERM / SIGINT
=========  ==================================  ===================================
STARTING   ignored (the first load runs)       drain: stop after the version loading now, exit 0
SERVING    rescan the repository               drain: refuse new calls, finish in-flight ones, exit 0
DRAINING   ignored                             force: exit now, 128 + signal (143 / 130)
STOPPED    ignored                             force: exit now, 128 + signal (143 / 130)
=========  ==================================  ===================================

Only the transitions drawn above exist (STARTING may go straight to DRAINING). ``draining`` is an
event that is set once the state leaves STARTING/SERVING: the drain gate and the streams watch it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
from collections.abc import Callable
from typing import NoReturn

log = logging.getLogger(__name__)


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class Action(enum.Enum):
    IGNORE = "ignore"
    RELOAD = "reload"
    DRAIN = "drain"
    FORCE_EXIT = "force exit"


TRANSITIONS = {
    State.STARTING: {State.SERVING, State.DRAINING},
    State.SERVING: {State.DRAINING},
    State.DRAINING: {State.STOPPED},
    State.STOPPED: set(),
}

SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


def action_for(state: State, signum: int) -> Action:
    """What ``signum`` does in ``state`` (the table in this module's docstring)."""
    if signum == signal.SIGHUP:
        return Action.RELOAD if state is State.SERVING else Action.IGNORE
    if signum in (signal.SIGTERM, signal.SIGINT):
        return Action.DRAIN if state in (State.STARTING, State.SERVING) else Action.FORCE_EXIT
    return Action.IGNORE


def forced_exit_status(signum: int) -> int:
    """The exit status of a forced exit: 128 + the signal, as a shell reports a death by that signal."""
    return 128 + signum


class IllegalTransition(RuntimeError):
    """A transition the state machine does not have (a bug in the caller)."""


class Lifecycle:
    """The server's state; ``on_signal`` applies the table, moving to DRAINING itself on a drain signal."""

    def __init__(self) -> None:
        self.state = State.STARTING
        self.draining = asyncio.Event()

    @property
    def accepting(self) -> bool:
        """Whether new calls are taken (not once the drain has begun)."""
        return not self.draining.is_set()

    def to(self, state: State) -> None:
        if state is self.state:
            return
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"lifecycle: no transition from {self.state.value} to {state.value}")
        log.info("lifecycle: %s -> %s", self.state.value, state.value)
        self.state = state
        if state in (State.DRAINING, State.STOPPED):
            self.draining.set()

    def begin_drain(self) -> None:
        """STARTING or SERVING -> DRAINING; a no-op once draining or stopped."""
        if self.state in (State.STARTING, State.SERVING):
            self.to(State.DRAINING)

    def on_signal(self, signum: int) -> Action:
        """Decide (and log) what ``signum`` does now; a drain signal also moves the state to DRAINING."""
        action = action_for(self.state, signum)
        name = signal.Signals(signum).name
        if action is Action.IGNORE:
            log.warning("%s ignored while %s", name, self.state.value)
        elif action is Action.FORCE_EXIT:
            log.error(
                "%s while %s: forcing exit now (status %d), in-flight work is abandoned",
                name,
                self.state.value,
                forced_exit_status(signum),
            )
        elif action is Action.DRAIN:
            log.info("%s while %s: draining", name, self.state.value)
            self.begin_drain()
        else:
            log.info("%s: rescanning the repository", name)
        return action


def force_exit(signum: int) -> NoReturn:
    """Exit now with 128 + ``signum``, flushing the logs first (threads, executors and calls are abandoned)."""
    logging.shutdown()
    os._exit(forced_exit_status(signum))


def install_signal_handlers(loop: asyncio.AbstractEventLoop, on_signal: Callable[[int], None]) -> None:
    """Route SIGHUP, SIGTERM and SIGINT to ``on_signal(signum)`` on ``loop``, for the life of the process.

    Installed with ``signal.signal``, not ``loop.add_signal_handler``: the loop's handlers put the
    default action back when the loop closes, and a default SIGHUP kills the process. Once the loop
    has closed (the process is exiting), a signal means what it means in STOPPED.
    """

    def handler(signum: int, frame: object) -> None:
        try:
            loop.call_soon_threadsafe(on_signal, signum)
        except RuntimeError:  # the loop is closed
            if action_for(State.STOPPED, signum) is Action.FORCE_EXIT:
                force_exit(signum)

    for sig in SIGNALS:
        signal.signal(sig, handler)
