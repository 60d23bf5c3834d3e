"""RNG capture for checkpoints (plain types) and for per-step snapshots (fast, uncopied)."""
from __future__ import annotations

import random

import numpy as np
import torch

from raytrainer.utilities import _NumpyStateCache, rng_states, set_rng_states


def _draws() -> tuple:
    return random.random(), float(np.random.randn()), float(np.random.rand()), torch.rand(2).tolist()


def test_both_forms_restore_every_generator_exactly():
    np.random.seed(3)
    np.random.randn()  # leaves a cached Gaussian pending
    for plain in (True, False):
        state = rng_states(plain=plain)
        first = _draws()
        set_rng_states(state)
        assert _draws() == first
    plain = rng_states(plain=True)
    assert isinstance(plain["python"][1], list) and isinstance(plain["numpy"][1], torch.Tensor)


def test_fast_numpy_state_matches_get_state_through_draws_and_gaussians():
    cache = _NumpyStateCache()
    np.random.seed(0)
    first = cache.get()
    assert cache._usable, "numpy's MT19937 layout check failed: snapshots read the RNG the slow way"
    assert cache.get() is first  # nothing moved: the same state object, no copy
    steps = [np.random.rand, np.random.randn, np.random.randn, lambda: np.random.randint(5), lambda: None,
             np.random.randn, lambda: np.random.bytes(5000)]
    for step in steps:
        step()
        fast, slow = cache.get(), np.random.get_state()
        assert fast[0] == slow[0] and np.array_equal(fast[1], slow[1]) and fast[2:] == slow[2:]
