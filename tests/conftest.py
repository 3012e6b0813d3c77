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
