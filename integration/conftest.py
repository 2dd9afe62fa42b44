import pytest
from processes import BACKENDS, SCRIPTS, run_under_each


def pytest_report_header():
    # Pairs and cases of the backends not selected are never collected: say
    # which ones this run covers.
    return f"integration backends: {' '.join(BACKENDS)} (INTEGRATION_BACKENDS)"


@pytest.fixture(scope="session")
def saved_everywhere(tmp_path_factory):
    """Each backend saves its models, then each backend loads all of them.

    Two rounds of one fresh process per selected backend: `save` writes
    DIR/<saver>/ (models, weight files, the saver's own reference results, the
    invalid-id report); `load` writes DIR/<saver>/loaded_by_<loader>/ for
    every saver.
    """
    root = tmp_path_factory.mktemp("cross_backend")
    run_under_each(SCRIPTS / "cross_backend.py", "save", root)
    run_under_each(SCRIPTS / "cross_backend.py", "load", root, *BACKENDS)
    return root
