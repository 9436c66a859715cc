import os
import sys

# tests import helpers such as reference_shampoo from this folder
sys.path.insert(0, os.path.dirname(__file__))
# the recipes' helpers (recipes/recipes_support) are imported as the recipes import them: from their folder
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
# no Hub access in tests: fail fast instead of retrying the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# OpenMP threads that spin while waiting starve any second process on a 2-core machine (the torchrun DDP
# test, or a parallel job): eigh then took 1-10 s instead of 3-5 ms. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
