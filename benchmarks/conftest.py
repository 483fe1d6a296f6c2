"""Benchmark setup: the epoch table printed at the end of the run. The environment (Triton interpreter on
CPU, hub offline) and the `gpu` skip come from the repository's root conftest.py, shared with tests/."""
import pytest

RESULTS_KEY = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[RESULTS_KEY] = []


@pytest.fixture(scope="session")
def epoch_results(pytestconfig):
    """The list every epoch benchmark appends its record to (read by the summary below)."""
    return pytestconfig.stash[RESULTS_KEY]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    records = config.stash.get(RESULTS_KEY, [])
    if not records:
        return
    from epoch_report import table  # benchmarks/ is on sys.path (rootdir-relative conftest import)

    terminalreporter.write_sep("=", "fastprompt: one training epoch per engine")
    terminalreporter.write_line(table(records))
