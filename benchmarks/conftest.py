"""pytest configuration of the pytest-benchmark suites, one per op: ``bench_<op>.py``.

They are not part of the test run (pyproject's ``testpaths`` is ``tests/``, and the file names
do not match ``test_*.py``). Run one suite, or all of them:

    .venv/bin/python -m pytest benchmarks/bench_supcon.py
    .venv/bin/python -m pytest benchmarks
"""

import pytest


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself; collect the others
    # (``pytest benchmarks``) here, so that no suite is collected twice.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
