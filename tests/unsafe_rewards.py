"""Reward functions that misbehave, for the scorer's tests: they raise, hang, segfault or exit
the process. Light imports: the scorer's worker processes import this module."""

from __future__ import annotations

import ctypes
import os
import time


def boom(prompts, completions, **_):
    raise RuntimeError("reward bug")


def sleepy(prompts, completions, **_):
    time.sleep(3)
    return [1.0] * len(completions)


def hangs(prompts, completions, **_):
    while True:
        time.sleep(1)


def segfaults(prompts, completions, **_):
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def exits(prompts, completions, **_):
    os._exit(3)


def length(prompts, completions, **_):
    """A well-behaved one: the completion's length."""
    return [float(len(c)) for c in completions]


def marks_then_sleeps(prompts, completions, marker: str = "", **_):
    """Touches `marker` (the test's cue that a score call is in flight), then takes 2 s."""
    open(marker, "a").close()
    time.sleep(2)
    return [float(len(c)) for c in completions]
