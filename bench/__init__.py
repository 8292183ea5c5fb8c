"""`make bench`: the Arch-Router engine against PyTorch and Optimum baselines (not a test).

Run as `python -m bench [--layers N] [--samples N] ...`; see `--help`.
"""
