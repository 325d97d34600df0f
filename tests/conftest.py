import gc

import jax
import pytest
from hypothesis import Phase, settings

# Exactness is checked in float64: the strategies must agree to rounding.
jax.config.update("jax_enable_x64", True)
# As Diffrax's own suite: no implicit rank or dtype promotion anywhere.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Property tests compile once per drawn structure, so examples are few and slow. CI runs
# a handful, the same every time, and reports a failure as drawn (shrinking it would
# recompile for each attempt); `pytest --hypothesis-profile=long` runs many, at random,
# and shrinks what fails.
settings.register_profile(
    "ci",
    max_examples=2,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
)
settings.register_profile("long", max_examples=100, deadline=None)
settings.load_profile("ci")


@pytest.fixture
def getkey():
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 1000))
    return lambda: next(keys)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs(request):
    """After each test module, drop what it compiled: XLA's CPU executables hold about
    a thousand memory maps each while cached, and Linux allows a process 65530, which
    the whole suite in one process would otherwise exceed (a segfault in XLA)."""
    yield
    for value in vars(request.module).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()  # the module's functools caches of compiled functions
    jax.clear_caches()
    gc.collect()
