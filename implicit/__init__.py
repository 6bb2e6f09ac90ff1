"""Implicit differentiation of solutions (custom_root, custom_fixed_point, hypergradients)."""
