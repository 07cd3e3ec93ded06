"""Example scripts of keras_dst: reproduce the experiments of "Fantastic Weights and How to
Find Them" (train.py, sweep.py, plot.py; see README.md)."""
