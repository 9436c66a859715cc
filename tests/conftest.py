import os
import sys

# tests import helpers such as reference_shampoo from this folder
sys.path.insert(0, os.path.dirname(__file__))
# no Hub access in tests: fail fast instead of retrying the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
