import os

import pytest

import benchmark.compat  # noqa: F401  (before any test imports transformers)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """One syn-base cache per test session, never the user's own."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["CDAP_CACHE"] = str(path)
    yield path


@pytest.fixture(scope="session")
def tiny_suite():
    from tasks import load_suite

    return load_suite("syn6", "tiny")
