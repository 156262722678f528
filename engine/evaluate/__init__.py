"""Stage 8, evaluate: are a run's attributions right? Counterfactual checks with retrained models.

Owns: the statistics (``stats``), the methods compared (``methods``), retraining with the run's
trainer and measuring the model output (``retrain``), the cache of retrained models
(``common``), the linear datamodeling score (``lds``), removal experiments (``removal``),
verifying a basket by retraining (``clean``, ``clean_train``), comparing two runs
(``compare``, ``compare_report``) and the demo world's ground-truth checks (``groundtruth``);
the choices its flags take (``choices``).

May import: everything below it (``errors``, ``files``, ``data``, ``models``, ``attribution``,
``run``, ``search``, ``explore``, ``explain``, ``curate``); never ``engine.assemble``.
"""
