"""T x T solvers, one module per problem; every loop reports a :class:`SolverInfo`."""
