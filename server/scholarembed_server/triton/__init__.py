"""The Triton door: the model repository's `model.py` runs the shared engine inside Triton's Python
backend; `launcher` starts the tritonserver binary bundled in nvidia-pytriton, without Docker."""
