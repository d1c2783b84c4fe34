"""Benchmarks: `make bench` (pytest bench). Files are bench_*.py; each test
may add a line to the ratio summary printed at the end of the run."""

import pytest

RATIOS = []


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture
def report():
    """report("what", value_text): one line of the closing summary."""
    return lambda what, text: RATIOS.append(f"{what}: {text}")


def pytest_terminal_summary(terminalreporter):
    if RATIOS:
        terminalreporter.section("ratios (same run)")
        for line in RATIOS:
            terminalreporter.write_line(line)
