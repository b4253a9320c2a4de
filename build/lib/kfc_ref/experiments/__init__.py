"""The application layer: commands, runs, checks, figures and benchmarks.

* :mod:`~kfc_ref.experiments.train`: the training loop and ``train``; checkpoints and resume
  (:mod:`~kfc_ref.experiments.checkpoint`); the learning-rate ``sweep``;
* :mod:`~kfc_ref.experiments.checks` and :mod:`~kfc_ref.experiments.paper_checks`: ``check``,
  the paper's theorems on fresh random cases;
* :mod:`~kfc_ref.experiments.studies`, :mod:`~kfc_ref.experiments.plotting`,
  :mod:`~kfc_ref.experiments.figures`, :mod:`~kfc_ref.experiments.tour`: the figures'
  computations, their drawing, and the ``figures`` and ``tour`` commands;
* :mod:`~kfc_ref.experiments.bench`: the ``bench`` command.

Modules here are imported on demand by ``python -m kfc_ref``; importing this package imports
none of them.
"""
__all__ = ["bench", "checkpoint", "checks", "figures", "paper_checks", "plotting", "studies",
           "sweep", "tour", "train"]
