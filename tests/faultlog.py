"""Totals of the fault-injection suite, printed at the end of the pytest run (conftest)."""

TOTALS = {"trials run": 0, "faults survived": 0, "data lost": 0, "fuzz cases": 0}


def record(trials: int = 0, survived: int = 0, lost: int = 0, fuzz: int = 0) -> None:
    TOTALS["trials run"] += trials
    TOTALS["faults survived"] += survived
    TOTALS["data lost"] += lost
    TOTALS["fuzz cases"] += fuzz
