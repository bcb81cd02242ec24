"""MoVE: Mixture of Value Embeddings - a reference implementation.

Importing the package is cheap (no torch): the command line answers --help and
--version without loading PyTorch; the parts import what they need."""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "mixture-of-value-embeddings"  # the name on the package index; `move` there is another project

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+unknown"
