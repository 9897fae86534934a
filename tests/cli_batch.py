"""Several `jaxllm` command lines in one Python process: one JAX start-up for all of them.

Each command runs through `jaxllm.cli.main`, as the console script runs it, with its
stdout and stderr captured; an exception that escapes `main` is printed as the
interpreter would print it (a traceback), so "no traceback" checks keep their meaning.
Used as ``python tests/cli_batch.py`` with a JSON list of argument lists on stdin; it
prints a JSON list of ``{returncode, stdout, stderr}``. The user-error tests start one
such process instead of one per case (each start costs a JAX import and backend init);
tests/test_cli.py keeps real single-command processes too.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import traceback


def run_all(argvs: list[list[str]]) -> list[dict]:
    """Runs each argument list through `jaxllm.cli.main` and captures what it printed."""
    from jaxllm.cli import main

    results = []
    for argv in argvs:
        out, err = io.StringIO(), io.StringIO()
        # main() calls logging.basicConfig: without this, every later command would log
        # into the first command's captured stderr.
        logging.root.handlers.clear()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse errors exit with 2
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:
                traceback.print_exc()
                code = 1
        results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    logging.root.handlers.clear()
    return results


if __name__ == "__main__":
    print(json.dumps(run_all(json.load(sys.stdin))))
