"""The Hydra configs of the commands (``spar-train``, ``spar-eval``, ...), shipped as package
data: the commands find them as ``pkg://spar.configs``, Python code as :data:`CONFIG_DIR`."""

from pathlib import Path

#: The folder of the configs (``train.yaml``, ``backbone/``, ``dataset/``, ...).
CONFIG_DIR = Path(__file__).resolve().parent
