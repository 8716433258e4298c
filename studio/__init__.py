"""Diffusion Studio: the application (data, training, jobs, evaluation, benchmarks, CLI, UI).

Importing this package is cheap; heavy imports happen inside the functions that need them.
"""
__version__ = "0.1.0"
