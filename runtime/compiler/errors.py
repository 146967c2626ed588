"""The root of every exception LoopTune raises on purpose.

``except LoopTuneError`` catches all of them; each subclass also derives from the builtin
that numpy users would expect (``ValueError`` for bad input, ``RuntimeError`` for a failed
build, ...), so existing ``except ValueError`` code keeps working.
"""
from __future__ import annotations


class LoopTuneError(Exception):
    """Base class of LoopTune's own exceptions."""
