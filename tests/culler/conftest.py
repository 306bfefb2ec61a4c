"""Make this folder's helper modules (culler_env, fault_proxy) importable under --import-mode=importlib."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
