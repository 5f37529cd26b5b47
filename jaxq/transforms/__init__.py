"""Orthogonal transforms of vectors along the last axis, as pure jittable functions: the fast
(randomized) Hadamard transform and QuIP's Kronecker transform. The seeded, stored forms a
quantized weight carries are `jaxq.formats.rotation`."""

from jaxq.transforms import hadamard, kronecker
from jaxq.transforms.hadamard import UnsupportedSizeError, hadamard_transform, randomized_hadamard
from jaxq.transforms.kronecker import kronecker_transform

__all__ = ["UnsupportedSizeError", "hadamard", "hadamard_transform", "kronecker", "kronecker_transform",
           "randomized_hadamard"]
