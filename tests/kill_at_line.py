"""Run a module as ``__main__`` and SIGKILL this process at the N-th line of project code it executes.

    python tests/kill_at_line.py N COUNT_FILE MODULE [ARGS...]

Counting executed lines of ``recsys/`` and ``embedding_jobs/`` (not of the libraries) spreads kill points over
everything the job does: inside a batch, between writing a file and renaming it, halfway through a merge.
N = 0 never kills and writes the number of lines the whole run executed to COUNT_FILE, so a test can draw
points over the run.
"""

import os
import runpy
import signal
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = tuple(str(REPO / p) + os.sep for p in ("recsys", "embedding_jobs"))

kill_at, count_file, module, *args = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], *sys.argv[4:]
executed = 0


def _line(frame, event, arg):
    global executed
    if event == "line":
        executed += 1
        if executed == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return _line


def _call(frame, event, arg):
    return _line if frame.f_code.co_filename.startswith(ROOTS) else None


sys.argv = [module, *args]
threading.settrace(_call)
sys.settrace(_call)
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as e:
    if e.code not in (0, None):
        raise
finally:
    sys.settrace(None)
    if kill_at == 0:
        count_file.write_text(str(executed))
