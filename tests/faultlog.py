"""Totals of the fault-injection suite, printed at the end of the pytest run (conftest).

Under pytest-xdist the tests run in worker processes, so each ``record`` appends one
JSON line to a file the controlling process named (``JAXLLM_FAULTLOG``) and the
summary adds the lines up.
"""

import json
import os

KEYS = ("trials run", "faults survived", "data lost", "fuzz cases")


def record(trials: int = 0, survived: int = 0, lost: int = 0, fuzz: int = 0) -> None:
    """Adds one test's fault counts to the run's totals."""
    with open(os.environ["JAXLLM_FAULTLOG"], "a") as f:
        f.write(json.dumps(dict(zip(KEYS, (trials, survived, lost, fuzz), strict=True))) + "\n")


def totals() -> dict:
    """Sums every recorded line; all zeros when nothing was recorded."""
    out = dict.fromkeys(KEYS, 0)
    path = os.environ.get("JAXLLM_FAULTLOG", "")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                for k, v in json.loads(line).items():
                    out[k] += v
    return out
