import os

# Set before JAX starts, and inherited by the tests' child processes:
# - several simulated CPU devices, for the sharding tests;
# - no LLVM optimisation of XLA:CPU's kernels. The tests run small programs, so compiling
#   is most of their time, and this flag cuts it by about a third. It changes neither the
#   HLO (fusion, dtypes, collectives: what tests read) nor the float semantics (XLA:CPU
#   does not enable fast math), only how fast the machine code runs.
TEST_XLA_FLAGS = {"--xla_force_host_platform_device_count": "8", "--xla_backend_optimization_level": "0"}
_given = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(
    _given + [f"{k}={v}" for k, v in TEST_XLA_FLAGS.items() if not any(f.startswith(k + "=") for f in _given)]
)

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    """Run the tests marked ``slow`` (minutes each: whole training runs, child processes)
    first: under ``pytest -n 2`` they then overlap with the many short tests instead of
    running alone at the end, which made the suite's wall time depend on where the
    scheduler happened to place them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _rng_per_test(request):
    """Reseed a test module's ``RNG`` from the test's own id before each test, so that
    what a test draws depends on that test alone, not on which tests ran before it in
    the same worker (``pytest -n 2`` distributes them differently from run to run): a
    failing draw then reproduces with ``pytest <its id>``. ``SCALIFY_TEST_SEED=<n>``
    draws another set (to look for draws a test's tolerance does not cover)."""
    module = request.module
    if isinstance(getattr(module, "RNG", None), np.random.Generator):
        salt = int(os.environ.get("SCALIFY_TEST_SEED", "0"))
        module.RNG = np.random.default_rng([zlib.crc32(request.node.nodeid.encode()), salt])
    yield
