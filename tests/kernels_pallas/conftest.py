import secrets

import numpy as np
import pytest


@pytest.fixture
def fresh_rng(request):
    """New random inputs every run (issue 5); the seed is in the test id's report on failure."""
    seed = secrets.randbits(32)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)
