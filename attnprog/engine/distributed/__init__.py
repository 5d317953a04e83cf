"""attnprog on a Ray cluster: program evaluation, ranking and the sweep, spread over many machines.

Ray is an optional extra (``pip install 'attnprog[ray]'``) imported only here, and this
package only where a caller asks for a cluster (``--ray ADDRESS|auto``). Each module mirrors
a single-machine stage and calls the same code, so its results equal the single-process ones:

    cluster   connect to a cluster (or start a local one) and read its resources
    evaluate  sandboxed program evaluation as Ray tasks (``evaluate_programs`` on each node)
    rank      ranking sharded over heads by actors; a lost actor's chunk is retried elsewhere
    sweep     the head-replacement sweep's fractions as independent tasks, one model each
"""
