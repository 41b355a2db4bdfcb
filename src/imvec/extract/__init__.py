"""Image collections to feature files: ``run(ExtractJob(...))``, resumable, local or on Ray.

``imvec extract`` is a thin layer over this package: :class:`ExtractJob` says what to do,
:func:`run` does it and returns an :class:`ExtractResult`; :func:`read_features` reads the
result back and :func:`nearest` searches it.
"""

from imvec.extract.job import ExtractJob, ExtractResult
from imvec.extract.neighbors import nearest, neighbors
from imvec.extract.runner import run
from imvec.extract.sink import read_features, read_metadata

__all__ = ["ExtractJob", "ExtractResult", "nearest", "neighbors", "read_features",
           "read_metadata", "run"]
