import pytest
from processes import SCRIPTS, run_under_each


@pytest.fixture(scope="session")
def saved_everywhere(tmp_path_factory):
    """Each backend saves its models, then each backend loads all of them.

    Two rounds of three fresh processes: `save` writes DIR/<saver>/ (models,
    weight files, the saver's own reference results, the invalid-id report);
    `load` writes DIR/<saver>/loaded_by_<loader>/ for every saver.
    """
    root = tmp_path_factory.mktemp("cross_backend")
    run_under_each(SCRIPTS / "cross_backend.py", "save", root)
    run_under_each(SCRIPTS / "cross_backend.py", "load", root)
    return root
