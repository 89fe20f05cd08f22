"""weightd: a per-node model-weight daemon.

Load a model once per machine into POSIX shared memory; every process attaches to the same
pages zero-copy. The client API is ``weightd.client``; the daemon is ``weightd serve``.
This package's top level imports nothing heavy, so the client stays thin.
"""

__version__ = "0.1.0"
