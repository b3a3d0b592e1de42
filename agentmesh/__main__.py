"""``python -m agentmesh`` and the ``agentmesh`` console script: the command line.

The cyclic garbage collector is paused while the command line and everything it runs are
imported: those imports allocate hundreds of thousands of objects that live as long as the
process (modules, classes, pydantic schemas), and collecting them again and again as the heap
grows costs CPU on every start (goal S7: an agent's start to its first call; see
docs/benchmarks.md). They are then frozen (``gc.freeze``: never examined again) and collection
resumes as usual.
"""

import gc


def main() -> None:
    gc.disable()
    from agentmesh.cli import main as run_cli

    gc.freeze()
    gc.enable()
    run_cli()


if __name__ == "__main__":
    main()
