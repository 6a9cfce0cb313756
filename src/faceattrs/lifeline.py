"""Child processes that end when their parent ends, however it ends.

A process started with ``multiprocessing``'s spawn (a photo worker of
:class:`faceattrs.predict.FaceAnalyzer`, a ``faceattrs serve --workers N`` server process)
holds both ends of its own pipes, so when its parent is killed with SIGKILL it never reads
an end of file: it waits forever, re-parented to init, and keeps the resource tracker
alive too (the tracker ends once every holder of its pipe has). :func:`exit_with_parent`,
called first thing in the child, ends it instead.
"""

from __future__ import annotations

import os
import threading
import time

POLL_S = 0.5  # how often a child looks at its parent: it ends at most this long after it
ORPHANED = 70  # the exit status of a child ended by its lifeline (EX_SOFTWARE)


def exit_with_parent(parent: int, poll: float = POLL_S) -> threading.Thread:
    """End this process (``os._exit``) within ``poll`` seconds of the end of ``parent``.

    A daemon thread compares ``os.getppid()`` with ``parent``: an orphan is re-parented
    (to init or a sub-reaper), so the two differ once the parent is gone, whatever ended
    it. This works on every platform and, unlike Linux's ``PR_SET_PDEATHSIG``, does not
    fire when merely the parent's thread that started the child ends. ``parent`` is the
    pid the parent passed down (read here it could already be the new parent's). The
    thread needs Python's lock, so a child inside a long native call (dlib's detector)
    ends when that call returns.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(ORPHANED)

    thread = threading.Thread(target=watch, name="faceattrs-lifeline", daemon=True)
    thread.start()
    return thread
