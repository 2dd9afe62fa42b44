import pytest
from processes import BACKENDS, SCRIPTS, run_under_each


def pytest_report_header():
    # Pairs and cases of the backends not selected are never collected: say
    # which ones this run covers.
    return f"integration backends: {' '.join(BACKENDS)} (INTEGRATION_BACKENDS)"


@pytest.fixture(scope="session")
def saved_scripts(tmp_path_factory):
    """Each backend saves its models, then each backend loads all of them,
    for the four save/load scripts at once (scripts/saved_everywhere.py).

    Two rounds of one fresh process per selected backend: `save` writes
    DIR/<script>/<saver>/ (models, weight files, the saver's own reference
    results); `load` writes DIR/<script>/<saver>/loaded_by_<loader>/ (or
    resumed_by_<loader>/) for every saver.
    """
    root = tmp_path_factory.mktemp("saved")
    run_under_each(SCRIPTS / "saved_everywhere.py", "save", root)
    run_under_each(SCRIPTS / "saved_everywhere.py", "load", root, *BACKENDS)
    return root


@pytest.fixture(scope="session")
def saved_everywhere(saved_scripts):
    """scripts/cross_backend.py's files, and its invalid-id report."""
    return saved_scripts / "cross_backend"
