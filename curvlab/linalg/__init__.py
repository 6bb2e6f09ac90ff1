"""Krylov and randomized linear algebra in torch, on the operator's device."""
