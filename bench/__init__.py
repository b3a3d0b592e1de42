"""Benchmarks for agentmesh: a measuring engine, baseline targets and the ``run`` CLI.

``bench.run.main`` is the entry point (also for ``agentmesh bench``); ``bench.harness``
holds the engine and the :class:`~bench.harness.Target` plug-in interface;
``bench.baselines`` the three baselines the mesh is compared against.
"""
