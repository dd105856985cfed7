"""Training UltimusNet, the pieces of `train.py`: the command line (cli), the loop and evaluation (loop),
the LR range test (lr_find), checkpoints (checkpoints) and plots (plots)."""
