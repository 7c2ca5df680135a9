"""One-off experiments and device scripts (not installed with ditdeploy): run from a checkout's root as
``python -m experiments.<name>``. Their measured results live in ``bench/results/`` (see its README)."""
