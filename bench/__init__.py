"""Benchmarks for agentmesh: a measuring engine, baseline targets and the scenarios s1–s7.

``bench.run.run_benchmarks`` is what ``agentmesh bench`` runs (``bench.run.main`` parses the same
options for ``python bench/run.py``); ``bench.harness`` runs the rounds (its docstring maps the
other parts); ``bench.targets`` is the :class:`~bench.targets.Target` plug-in interface;
``bench.baselines`` the three baselines the mesh is compared against. The wheel ships this
package as ``agentmesh._bench``, so its modules import each other relatively.
"""
