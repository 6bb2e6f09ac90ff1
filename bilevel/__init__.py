"""Bilevel problems and solvers."""
