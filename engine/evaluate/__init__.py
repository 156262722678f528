"""Stage 8, evaluate: are a run's attributions right? Counterfactual checks with retrained models.

Owns: the statistics (``stats``), the methods compared (``methods``), retraining with the run's
trainer and measuring the model output (``retrain``), the cache of retrained models
(``common``), the linear datamodeling score (``lds``), removal experiments (``removal``) and the
demo world's ground-truth checks (``groundtruth``).

May import: ``errors``, ``files``, ``data``, ``models``, ``attribution``, ``run``.
"""
