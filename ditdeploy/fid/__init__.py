"""Distribution-level quality: FID, Inception Score, sFID, precision / recall of sample batches.

- ``evaluate(FidRequest(samples, ref, ...)) -> dict``: the library call behind ``ditdeploy fid`` (``evaluate``).
- ``stats``: streaming mean/covariance, ``frechet_distance``, ``InceptionScore``, ``precision_recall`` (numpy).
- ``digits``: the offline extractor for 8x8 digits, trained in-process (numpy); ``--ref digits``.
- ``inception``: the FID InceptionV3 (torch) loading pytorch-fid's published weights from a local file.
- ``npz``: streaming reads of ADM-layout npz files.
"""

from ditdeploy.fid.evaluate import DIGITS_REF, FidRequest, evaluate
from ditdeploy.fid.stats import InceptionScore, RunningStats, frechet_distance, precision_recall

__all__ = ["DIGITS_REF", "FidRequest", "InceptionScore", "RunningStats", "evaluate", "frechet_distance",
           "precision_recall"]
