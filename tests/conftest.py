import jax
import pytest

# Exactness is checked in float64: the strategies must agree to rounding.
jax.config.update("jax_enable_x64", True)
# As Diffrax's own suite: no implicit rank or dtype promotion anywhere.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 1000))
    return lambda: next(keys)
