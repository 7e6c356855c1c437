"""``python -m gradwise``: the command line (:func:`gradwise.cli.main`).

A rank that torchrun started (``TORCHELASTIC_RUN_ID`` set) and whose command succeeded leaves by
``os._exit(0)`` once its output is flushed, without the interpreter's teardown: there the process
group's C++ objects that outlive ``destroy_process_group`` (gloo's) are destroyed, and now and then that
aborts the finished process (``terminate called without an active exception``, SIGABRT; seen in CI
runs of the distributed command-line tests, and reproduced by hand in a few percent of 2-rank FedAvg
jobs, none with this exit). Every file the command wrote is
closed by then (they are written in ``with`` blocks). A rank that failed ends as before: its exit, and
when torchrun sees it, stay what the launcher's report of a lost peer expects
(:func:`gradwise.cli.launch.run_under_torchrun`)."""

import logging
import os
import sys

from gradwise.cli import main

code = main()
if code == 0 and os.environ.get("TORCHELASTIC_RUN_ID"):
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
sys.exit(code)
