"""Model compression: distillation losses, magnitude pruning, int8 quantization.

Pure building blocks; `train.py` wires them into the steps and the optimizer.
"""
