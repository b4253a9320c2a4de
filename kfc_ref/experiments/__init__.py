"""The application layer: commands, runs, checks, figures and benchmarks.

* :mod:`~kfc_ref.experiments.train`: the training loop and ``train``; its settings and
  ``config.json`` (:mod:`~kfc_ref.experiments.config`), run directories
  (:mod:`~kfc_ref.experiments.rundir`), atomic checkpoints (:mod:`~kfc_ref.experiments.checkpoint`),
  ``metrics.csv`` (:mod:`~kfc_ref.experiments.metrics`), progress output
  (:mod:`~kfc_ref.experiments.progress`); the learning-rate ``sweep``; the command-line
  conventions they share (:mod:`~kfc_ref.experiments.cli`);
* :mod:`~kfc_ref.experiments.checks` and :mod:`~kfc_ref.experiments.paper_checks`: ``check``,
  the paper's theorems on fresh random cases;
* :mod:`~kfc_ref.experiments.studies`, :mod:`~kfc_ref.experiments.plotting`,
  :mod:`~kfc_ref.experiments.figures`, :mod:`~kfc_ref.experiments.tour`: the figures'
  computations, their drawing, and the ``figures`` and ``tour`` commands;
* :mod:`~kfc_ref.experiments.bench`: the ``bench`` command.

Modules here are imported on demand by ``python -m kfc_ref``; importing this package imports
none of them.
"""
__all__ = ["bench", "checkpoint", "checks", "cli", "config", "figures", "metrics", "paper_checks",
           "plotting", "progress", "rundir", "studies", "sweep", "tour", "train"]
