"""scripts/sm90_smoke.py's runner, which a device run depends on to name a Hopper kernel that
hangs or fails without losing the other cases: a case that hangs is killed and reported, one
that raises or kills its process is reported, and every other case still runs."""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import sm90_smoke  # noqa: E402

CASES = [("a",), ("hang",), ("b",), ("raise",), ("c",), ("die",), ("d",)]


def fake_case(case, n, d):
    if case == ("hang",):
        time.sleep(600)
    if case == ("raise",):
        raise RuntimeError("boom")
    if case == ("die",):
        os._exit(3)
    return case[0] * n


def test_runner_reports_hangs_errors_and_deaths_and_runs_the_rest():
    results = sm90_smoke.run_all(CASES, 2, 0, timeout=3, case_fn=fake_case)
    assert {c: r[0] for c, r in results.items()} == {
        ("a",): "done", ("hang",): "hang", ("b",): "done", ("raise",): "error", ("c",): "done",
        ("die",): "worker died", ("d",): "done"}
    assert results[("b",)][1] == "bb" and "boom" in results[("raise",)][1]
    assert "exit code 3" in results[("die",)][1]
