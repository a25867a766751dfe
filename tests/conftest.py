import os
import shutil
import tempfile

import pytest

# Tests never reach the network and never touch the user's caches.
os.environ.setdefault("ADJAX_OFFLINE", "1")

# One persistent compilation cache for a test run, shared by its xdist workers (they inherit the
# variable from the controller, which imports this first) and the processes they start (the same
# programs, e.g. a backbone at 64x64 or FEGAN's init, compile once, not in every test); a fresh
# folder per run, so no run reuses another's programs, removed when the run ends. Tests that study
# cold starts set JAX_COMPILATION_CACHE_DIR for their own subprocesses.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = os.path.join(tempfile.gettempdir(), f"adjax-test-xla-pid{os.getpid()}")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE


def pytest_sessionfinish(session):
  # Only the process that named the folder removes it: the controller, after its workers are done.
  if _XLA_CACHE is not None and not hasattr(session.config, "workerinput"):
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
BOTTLE = os.path.join(SHARED, "data", "mvtec_ad", "bottle")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  # One cache per test session: converted weights and the synthetic dataset are reused
  # across tests, but never written to the user's ~/.cache.
  monkeypatch.setenv("ADJAX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "adjax_cache"))


def require_bottle():
  if not os.path.isdir(BOTTLE):
    pytest.fail(f"real-data tests need {BOTTLE} (../shared beside the checkout)")
  return BOTTLE


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
  """The built-in dataset, generated once per test session (~9 s) for the tests that only read it."""
  from adjax.data import synthetic
  return synthetic.ensure_generated(str(tmp_path_factory.mktemp("synthetic_data") / "synthetic"))
